"""Pixel-space consistency losses on the decoded clean estimate ``ŷ`` (VAE output, [B,3,H,W], roughly [-1,1]).

Two families, chosen with ``--objective``:

* ``paper`` (E2P paper eqs. 9-11): depth -- scale-and-shift-invariant L1 after a least-squares fit of the prediction
  to the target (``e2p_core.alignment``); normals -- mean angular error (radians) from atan2; matting -- L1 on the
  unknown band plus L1 on the known region of the trimap.
* ``reference`` (what the released code trains with, E2P-SPEC §4.7): depth -- SILog on ``log(1 + ·)`` of the [0,1]
  maps plus Sobel gradient L1 on the dilated mask; normals -- angular error in degrees, bell-weighted, divided by
  100; matting -- L1/1000 + MSE + Gaussian-gradient term on the unknown band only.

Targets follow the training-sample contract: depth and matting targets are 3-channel copies in [-1,1]; normals
are unit vectors. ``valid`` [B,H,W] is the pixel mask; ``trimap`` [B,H,W] holds 0/128/255.
"""

import math

import torch
import torch.nn.functional as F

from e2p_core.alignment import align_scale_shift
from e2p_core.filters import gaussian_gradient_magnitude

NORMAL_EPS = 1e-8  # x / max(||x||, 1e-8)
SINE_FLOOR = 1e-12  # the reference's clamp_min on |n̂ × n|
COSINE_LIMIT = 1 - 1e-7  # the reference's clamp on n̂ · n
SILOG_VARIANCE_FOCUS = 0.85
DEPTH_EPSILON_01 = 1e-8  # added to the [0,1] maps before the log
MATTING_UNKNOWN = 128
MATTING_L1_DIVISOR = 1000.0  # the reference's sum/1000 terms
GRADIENT_SQRT_EPS = 1e-12  # keeps |∇_G| differentiable where the image is flat


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample mean of ``values`` [B,H,W] over ``mask`` [B,H,W]; 0 for a sample with an empty mask. -> [B]."""
    weights = mask.to(values.dtype)
    return (values * weights).sum(dim=(1, 2)) / weights.sum(dim=(1, 2)).clamp_min(1)


# ------------------------------------------------------------------------------------------------------------ paper


def ssi_depth_l1(decoded: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Scale-and-shift-invariant L1: fit ``s·p + t ≈ g`` on the valid pixels, then the mean ``|s·p + t - g|``.

    ``p`` and ``g`` are the channel means of prediction and target (the [-1,1] depth encoding).
    """
    prediction, truth = decoded.float().mean(dim=1), target.float().mean(dim=1)
    aligned = align_scale_shift(prediction, truth, valid)
    return masked_mean((aligned - truth).abs(), valid).mean()


def angular_error(prediction: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Angle between two normal fields [B,3,H,W] in radians [B,H,W], via atan2 as the reference computes it.

    Both fields are unit-normalised first. atan2 of (clamped |n̂ × n|, clamped n̂ · n) keeps the gradient finite
    where the vectors are (nearly) parallel, unlike ``acos`` of the dot product.
    """
    p = prediction.float() / prediction.float().norm(dim=1, keepdim=True).clamp_min(NORMAL_EPS)
    g = truth.float() / truth.float().norm(dim=1, keepdim=True).clamp_min(NORMAL_EPS)
    sine = torch.linalg.cross(p, g, dim=1).norm(dim=1).clamp_min(SINE_FLOOR)
    cosine = (p * g).sum(dim=1).clamp(-COSINE_LIMIT, COSINE_LIMIT)
    return torch.atan2(sine, cosine)


def angular_normal_loss(decoded: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean angular error in radians over the valid pixels, per sample, then over the batch."""
    return masked_mean(angular_error(decoded, target), valid).mean()


def matting_region_l1(decoded: torch.Tensor, target: torch.Tensor, trimap: torch.Tensor) -> torch.Tensor:
    """``mean_U |p - g| + mean_K |p - g|``: U is the trimap's unknown band (128), K the known FG/BG rest."""
    error = (decoded.float().mean(dim=1) - target.float().mean(dim=1)).abs()
    unknown = trimap == MATTING_UNKNOWN
    return (masked_mean(error, unknown) + masked_mean(error, ~unknown)).mean()


# -------------------------------------------------------------------------------------------------------- reference


def _sobel(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalised 3x3 Sobel derivatives of [B,H,W] with zero padding (cross-correlation, like ``F.conv2d``)."""
    kernel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=image.dtype,
                            device=image.device)
    kernels = torch.stack([kernel_x, kernel_x.T])[:, None]  # [2,1,3,3]
    gradients = F.conv2d(image[:, None], kernels, padding=1)
    return gradients[:, 0], gradients[:, 1]


def _depth01(image: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] in [-1,1] -> channel mean mapped to [0,1] (+1e-8), as the reference's depth loss reads it."""
    return (image.float().mean(dim=1).clamp(-1, 1) + 1) / 2 + DEPTH_EPSILON_01


def reference_depth_loss(decoded: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """SILog on ``log(1 + ·)`` pooled over the batch's valid pixels, plus Sobel-gradient L1 on the dilated mask."""
    prediction, truth = _depth01(decoded), _depth01(target)
    mask = valid.float()
    count = mask.sum().clamp_min(1)
    difference = torch.log1p(prediction) - torch.log1p(truth)
    mean = (difference * mask).sum() / count
    silog = (difference.square() * mask).sum() / count - SILOG_VARIANCE_FOCUS * mean.square()
    dilated = F.max_pool2d(mask[:, None], kernel_size=3, stride=1, padding=1)[:, 0]
    dilated_count = dilated.sum().clamp_min(1)
    (px, py), (gx, gy) = _sobel(prediction), _sobel(truth)
    gradient = ((px - gx).abs() * dilated).sum() / dilated_count + ((py - gy).abs() * dilated).sum() / dilated_count
    return silog + gradient


def reference_normal_loss(decoded: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
                          weight: torch.Tensor) -> torch.Tensor:
    """Per-sample mean angular error in degrees times the bell weight ``weight`` [B], batch mean, divided by 100."""
    degrees = angular_error(decoded, target) * (180 / math.pi)
    return (masked_mean(degrees, valid) * weight.float()).mean() / 100


def reference_matting_loss(decoded: torch.Tensor, target: torch.Tensor, trimap: torch.Tensor) -> torch.Tensor:
    """On the unknown band U only: ``Σ|p - g|/1000 + Σ(p - g)²/|U| + Σ(|∇_G p| - |∇_G g|)²/1000`` per sample."""
    prediction, truth = decoded.float().mean(dim=1), target.float().mean(dim=1)
    unknown = (trimap == MATTING_UNKNOWN).float()
    difference = (prediction - truth) * unknown
    count = unknown.sum(dim=(1, 2))
    l1 = difference.abs().sum(dim=(1, 2)) / MATTING_L1_DIVISOR
    mse = difference.square().sum(dim=(1, 2)) / (count + 1e-8)
    gradients = [gaussian_gradient_magnitude(x, padding="zeros", eps_sqrt=GRADIENT_SQRT_EPS)
                 for x in (prediction, truth)]
    gradient = ((gradients[0] - gradients[1]).square() * unknown).sum(dim=(1, 2)) / MATTING_L1_DIVISOR
    return (l1 + mse + gradient).mean()


def consistency_loss(task: str, objective: str, decoded: torch.Tensor, batch: dict, weight: torch.Tensor
                     ) -> torch.Tensor:
    """The consistency loss of ``task`` under ``objective`` ("paper" or "reference"); ``weight`` is the bell weight."""
    target, valid = batch["target"], batch["valid"]
    if task == "depth":
        return (ssi_depth_l1 if objective == "paper" else reference_depth_loss)(decoded, target, valid)
    if task == "normal":
        if objective == "paper":
            return angular_normal_loss(decoded, target, valid)
        return reference_normal_loss(decoded, target, valid, weight)
    if objective == "paper":
        return matting_region_l1(decoded, target, batch["trimap"])
    return reference_matting_loss(decoded, target, batch["trimap"])
