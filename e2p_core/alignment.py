"""Least-squares scale-and-shift alignment, shared by evaluation (metrics) and training (the SSI depth loss).

Relative-depth predictions are defined up to an affine map, so both sides first fit ``s·prediction + t ≈ target``
over the valid pixels and compare the aligned prediction. The fit is closed-form and differentiable, so a loss can
back-propagate through it.
"""

from __future__ import annotations

import torch


def fit_scale_shift(
    prediction: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``(scale, shift)`` minimising ``Σ_valid (scale·prediction + shift − target)²``.

    ``prediction``, ``target`` and ``valid`` (bool) share a shape ``[B, ...]``; the fit runs in float64 at least.
    Returns two ``[B]`` tensors in the prediction's dtype. A constant prediction (singular normal equations) gets
    scale 0 and the target's valid mean as shift; a sample with no valid pixel gets scale 0, shift 0.
    """
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
    compute_dtype = torch.promote_types(prediction.dtype, torch.float64)
    p = prediction.reshape(prediction.shape[0], -1).to(compute_dtype)
    g = target.reshape(target.shape[0], -1).to(compute_dtype)
    w = torch.ones_like(p) if valid is None else valid.reshape(valid.shape[0], -1).to(compute_dtype)
    # Normal equations of the 2×2 least-squares problem, one per sample.
    a00, a01, a11 = (w * p * p).sum(1), (w * p).sum(1), w.sum(1)
    b0, b1 = (w * p * g).sum(1), (w * g).sum(1)
    det = a00 * a11 - a01 * a01
    solvable = det.abs() > 1e-12 * (a00 * a11).clamp_min(1e-300)
    safe_det = torch.where(solvable, det, torch.ones_like(det))
    scale = torch.where(solvable, (a11 * b0 - a01 * b1) / safe_det, torch.zeros_like(det))
    mean_target = b1 / a11.clamp_min(1)
    shift = torch.where(solvable, (a00 * b1 - a01 * b0) / safe_det, mean_target)
    return scale.to(prediction.dtype), shift.to(prediction.dtype)


def align_scale_shift(
    prediction: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """``prediction`` mapped by its least-squares fit to ``target`` (see ``fit_scale_shift``); same shape."""
    scale, shift = fit_scale_shift(prediction, target, valid)
    view = (-1,) + (1,) * (prediction.dim() - 1)
    return prediction * scale.view(view) + shift.view(view)



def fit_scale_shift_symmetric(
    prediction: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``(scale, shift)`` for two maps that are BOTH noisy, e.g. neighbouring frames of a video.

    Least squares of ``target`` on ``prediction`` shrinks the scale by their correlation (regression dilution), and
    chained over a clip that shrinking compounds. The reduced-major-axis line does not: its scale is the geometric
    mean of the two least-squares slopes (``target`` on ``prediction``, and the inverse of ``prediction`` on
    ``target``), i.e. ``std(target) / std(prediction)`` with the sign of their covariance, and it passes through both
    means. Same shapes as :func:`fit_scale_shift`; a degenerate pair (no spread, or slopes of opposite signs) gets
    scale 0 and the target's mean as shift.
    """
    forward, _ = fit_scale_shift(prediction, target, valid)  # cov / var(prediction)
    backward, _ = fit_scale_shift(target, prediction, valid)  # cov / var(target)
    same_sign = forward * backward > 0
    ratio = forward / torch.where(same_sign, backward, torch.ones_like(backward))
    scale = torch.where(same_sign, torch.sign(forward) * ratio.abs().sqrt(), torch.zeros_like(forward))
    weights = torch.ones_like(prediction) if valid is None else valid.to(prediction.dtype)
    weights, p, g = (x.reshape(x.shape[0], -1) for x in (weights, prediction, target))
    count = weights.sum(1).clamp_min(1)
    mean_prediction, mean_target = (weights * p).sum(1) / count, (weights * g).sum(1) / count
    return scale, mean_target - scale * mean_prediction
