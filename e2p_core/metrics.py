"""Evaluation metrics of the three tasks, shared by the benchmark runner and training-time validation.

Each function scores ONE image and returns plain floats; averaging over a dataset is the caller's business (the
benchmarks average per-image values, E2P-SPEC §6). Inputs may be torch tensors or numpy arrays; everything is computed
in float64 on the CPU.

* Depth (§6.1): the affine-invariant prediction is least-squares aligned to the ground truth in a depth *space*, mapped
  back to metres, clipped to the valid range, and scored with the usual AbsRel, δ1..δ3, RMSE, SqRel, RMSE-log, log10 and
  SILog.
* Normals (§6.2): the angle between predicted and ground-truth vectors, in degrees, summarised per image
  (:func:`normal_metrics`, E2P) or over a whole dataset from pooled per-pixel errors (:func:`angular_error_metrics`
  of the concatenated :func:`normal_angular_errors`, FE2E).
* Matting (§6.3): MSE, MAD, SAD, Grad and Conn over the whole image with the conventional scalings of the Deep Image
  Matting evaluation (MSE and MAD per pixel, SAD / Grad / Conn summed and divided by 1000).
"""

from __future__ import annotations

import math

import numpy as np
import scipy.ndimage
import torch

from .alignment import align_scale_shift
from .filters import gaussian_gradient_magnitude
from .targets import depth_from_space, depth_to_space

DEPTH_METRICS = ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog", "delta1", "delta2", "delta3")
NORMAL_THRESHOLDS_DEG = (5.0, 7.5, 11.25, 22.5, 30.0)
NORMAL_METRICS = ("mean", "median", "rmse", *(f"below_{t:g}".replace(".", "_") for t in NORMAL_THRESHOLDS_DEG))
MATTING_METRICS = ("mse", "mad", "sad", "grad", "conn")

DELTA_BASE = 1.25
MATTING_SUM_SCALE = 1000.0  # SAD, Grad and Conn are reported in thousands, as in every matting paper
CONN_STEP = 0.1
CONN_MIN_DISTANCE = 0.15  # the DIM connectivity ignores distances to the threshold level below this


def _float64(values) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().double()
    return torch.as_tensor(np.asarray(values, dtype=np.float64))


def _mask(values) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().bool()
    return torch.as_tensor(np.asarray(values, dtype=bool))


# ---------------------------------------------------------------------------------------------------------- depth


def align_depth(
    prediction, depth_m, valid, space: str = "sqrt", min_depth: float = 1e-3, max_depth: float | None = None
) -> torch.Tensor:
    """The prediction ``[H,W]`` (affine-invariant, e.g. ``depth_affine01``) as metric depth ``[H,W]``, float64.

    ``s·prediction + t ≈ depth_to_space(depth_m, space)`` is fitted by least squares over ``valid``, mapped back with
    ``depth_from_space`` and clipped to ``[min_depth, max_depth]``. The default ``space="sqrt"`` is the official
    protocol for the released model, which was trained on sqrt depth: align ``sqrt(depth + 1e-6)``, then square. The
    official script picks the space from substrings of the checkpoint filename, so the README command
    (``depth.safetensors``) silently aligns in linear depth: that is ``space="uniform"``. FE2E's protocol is ``"log"``.
    """
    prediction, depth_m, valid = _float64(prediction), _float64(depth_m), _mask(valid)
    target = depth_to_space(depth_m, space)
    aligned = align_scale_shift(prediction[None], target[None], valid[None])[0]
    return depth_from_space(aligned, space).clamp(min_depth, max_depth)


def depth_metrics(
    prediction, depth_m, valid, space: str = "sqrt", min_depth: float = 1e-3, max_depth: float | None = None
) -> dict[str, float]:
    """Depth metrics of one image: ``prediction`` ``[H,W]`` in [0,1] (affine, near = 0) against ``depth_m`` ``[H,W]``
    in metres over the bool mask ``valid`` ``[H,W]``, after :func:`align_depth` in ``space``.

    Keys (``DEPTH_METRICS``): ``abs_rel`` = mean |p−g|/g, ``sq_rel`` = mean (p−g)²/g, ``rmse`` (m), ``rmse_log``,
    ``log10`` = mean |log10 p − log10 g|, ``silog`` = 100·sqrt(var(log p − log g)) (the BTS/ZoeDepth definition),
    ``delta1..3`` = fraction of pixels with max(p/g, g/p) < 1.25^k (fractions, not %). Pixels whose ground truth is not
    a positive finite number are never valid. Without any valid pixel every value is NaN.
    """
    depth_m, valid = _float64(depth_m), _mask(valid)
    valid = valid & torch.isfinite(depth_m) & (depth_m > 0)
    if not bool(valid.any()):
        return dict.fromkeys(DEPTH_METRICS, math.nan)
    safe_gt = torch.where(valid, depth_m, torch.ones_like(depth_m))  # the fit must not see NaN/inf outside the mask
    pred = align_depth(prediction, safe_gt, valid, space, min_depth, max_depth)[valid]
    gt = depth_m[valid]
    error = pred - gt
    log_error = torch.log(pred) - torch.log(gt)
    ratio = torch.maximum(pred / gt, gt / pred)
    return {
        "abs_rel": (error.abs() / gt).mean().item(),
        "sq_rel": (error**2 / gt).mean().item(),
        "rmse": error.pow(2).mean().sqrt().item(),
        "rmse_log": log_error.pow(2).mean().sqrt().item(),
        "log10": (torch.log10(pred) - torch.log10(gt)).abs().mean().item(),
        "silog": (log_error.pow(2).mean() - log_error.mean() ** 2).clamp_min(0).sqrt().item() * 100,
        **{f"delta{k}": (ratio < DELTA_BASE**k).double().mean().item() for k in (1, 2, 3)},
    }


# -------------------------------------------------------------------------------------------------------- normals


def normal_angular_errors(prediction, normals, valid) -> torch.Tensor:
    """Angles in degrees (float64 ``[N]``, N = valid pixels, row-major) between ``prediction`` and ``normals``
    (both ``[3,H,W]``, any length: the cosine normalises them) over the bool mask ``valid`` ``[H,W]``."""
    prediction, normals, valid = _float64(prediction), _float64(normals), _mask(valid)
    cosine = torch.nn.functional.cosine_similarity(prediction, normals, dim=0, eps=1e-8)  # [H,W]
    return torch.rad2deg(torch.acos(cosine.clamp(-1, 1)))[valid]


def angular_error_metrics(errors_deg) -> dict[str, float]:
    """Summary of angular errors in degrees: ``mean``, ``median`` (numpy's: the mean of the two middle values for an
    even count), ``rmse``, and ``below_5``, ``below_7_5``, ``below_11_25``, ``below_22_5``, ``below_30`` in % of pixels.
    Empty input gives NaN everywhere."""
    errors = _float64(errors_deg).reshape(-1)
    if errors.numel() == 0:
        return dict.fromkeys(NORMAL_METRICS, math.nan)
    summary = {
        "mean": errors.mean().item(),
        # numpy, not torch.quantile: that one refuses more than 2^24 values, which a pooled dataset exceeds.
        "median": float(np.median(errors.numpy())),
        "rmse": errors.pow(2).mean().sqrt().item(),
    }
    for name, threshold in zip(NORMAL_METRICS[3:], NORMAL_THRESHOLDS_DEG):
        summary[name] = (errors < threshold).double().mean().item() * 100
    return summary


def normal_metrics(prediction, normals, valid) -> dict[str, float]:
    """Angular-error metrics of one image (the E2P protocol: per image, then the caller averages over images);
    see :func:`normal_angular_errors` and :func:`angular_error_metrics`."""
    return angular_error_metrics(normal_angular_errors(prediction, normals, valid))


# -------------------------------------------------------------------------------------------------------- matting


def matting_metrics(alpha_pred, alpha_gt) -> dict[str, float]:
    """Matting metrics of one image over the whole image: ``alpha_pred`` and ``alpha_gt`` ``[H,W]`` in [0,1].

    ``mse`` = Σ(p−g)²/N and ``mad`` = Σ|p−g|/N (per pixel); ``sad`` = Σ|p−g|/1000; ``grad`` = Σ(|∇p| − |∇g|)²/1000
    with the Gaussian-derivative gradient (σ = 1.4, edge-replicated borders, ``e2p_core.filters``); ``conn`` =
    :func:`connectivity_error`.
    """
    pred, gt = _float64(alpha_pred), _float64(alpha_gt)
    if pred.shape != gt.shape or pred.dim() != 2:
        raise ValueError(f"alpha_pred {tuple(pred.shape)} and alpha_gt {tuple(gt.shape)} must be the same [H,W]")
    difference = pred - gt
    gradients = gaussian_gradient_magnitude(torch.stack([pred, gt]), padding="replicate")  # [2,H,W]
    return {
        "mse": difference.pow(2).mean().item(),
        "mad": difference.abs().mean().item(),
        "sad": difference.abs().sum().item() / MATTING_SUM_SCALE,
        "grad": (gradients[0] - gradients[1]).pow(2).sum().item() / MATTING_SUM_SCALE,
        "conn": connectivity_error(pred.numpy(), gt.numpy()),
    }


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected foreground component of a bool mask (MATLAB ``bwconncomp(mask, 4)``)."""
    labels, count = scipy.ndimage.label(mask)  # default structure: 4-connectivity in 2-D
    if count == 0:
        return np.zeros_like(mask, dtype=bool)
    sizes = np.bincount(labels.ravel())[1:]  # label 0 is the background, never a candidate
    return labels == int(np.argmax(sizes)) + 1


def connectivity_error(alpha_pred: np.ndarray, alpha_gt: np.ndarray, step: float = CONN_STEP) -> float:
    """The Deep Image Matting connectivity error over the whole image, divided by 1000.

    For thresholds ``step, 2·step, .., 1``: a pixel's level ``l`` is the last threshold below the first one at which it
    falls out of the largest connected component of ``(pred ≥ t) & (gt ≥ t)`` (1 if it never does). Each alpha becomes
    ``φ = 1 − d·[d ≥ 0.15]`` with ``d = alpha − l``, and the error is Σ|φ_pred − φ_gt|.
    """
    pred, gt = np.asarray(alpha_pred, dtype=np.float64), np.asarray(alpha_gt, dtype=np.float64)
    thresholds = np.arange(0, 1 + step, step)  # as the reference: 0, 0.1, .., 1.0 with float rounding
    level = np.full(pred.shape, -1.0)
    for previous, threshold in zip(thresholds[:-1], thresholds[1:]):
        connected = _largest_component((pred >= threshold) & (gt >= threshold))
        level[(level == -1) & ~connected] = previous
    level[level == -1] = 1.0
    phi_pred = 1 - (pred - level) * ((pred - level) >= CONN_MIN_DISTANCE)
    phi_gt = 1 - (gt - level) * ((gt - level) >= CONN_MIN_DISTANCE)
    return float(np.abs(phi_pred - phi_gt).sum() / MATTING_SUM_SCALE)
