"""Target encodings of the three tasks (what the DiT learns to predict) and the inverse maps evaluation needs.

Depth (E2P-SPEC §4.4): metres → a monotone "space" (``sqrt`` as released, FE2E's ``log``, or ``uniform``) → affine
normalisation by the 2nd/98th percentiles of the valid pixels → ``[-1, 1]`` with near = −1. The model output is
therefore affine-invariant in that space: evaluation aligns in the same space and maps back with ``depth_from_space``.
Normals (§4.5): unit vectors in the E2P camera frame (+x left, +y up, +z toward the camera).
Matting (§4.6): alpha in ``[-1, 1]``, binarised at 0.5 as the paper says, or soft as the release trains.
"""

from __future__ import annotations

import numpy as np
import torch

DEPTH_SPACES = ("sqrt", "log", "uniform")
DEPTH_EPSILON = 1e-6  # added before sqrt/log, as the reference does
NORMAL_MIN_NORM = 1e-3  # shorter ground-truth vectors are invalid pixels


def _check_space(space: str) -> None:
    if space not in DEPTH_SPACES:
        raise ValueError(f"depth space must be one of {DEPTH_SPACES}, got {space!r}")


def depth_to_space(depth_m: torch.Tensor, space: str = "sqrt") -> torch.Tensor:
    """Depth in metres → the training space: ``sqrt(d + 1e-6)``, ``log(d + 1e-6)`` or ``d``."""
    _check_space(space)
    if space == "sqrt":
        return torch.sqrt(depth_m.clamp_min(0) + DEPTH_EPSILON)
    if space == "log":
        return torch.log(depth_m.clamp_min(0) + DEPTH_EPSILON)
    return depth_m


def depth_from_space(values: torch.Tensor, space: str = "sqrt") -> torch.Tensor:
    """Inverse of ``depth_to_space``, in metres, clamped at 0 (an aligned prediction may leave the domain)."""
    _check_space(space)
    if space == "sqrt":
        return (values.clamp_min(0) ** 2 - DEPTH_EPSILON).clamp_min(0)
    if space == "log":
        return (torch.exp(values) - DEPTH_EPSILON).clamp_min(0)
    return values.clamp_min(0)


def encode_depth_target(
    depth_m: torch.Tensor, valid: torch.Tensor, space: str = "sqrt", percentiles: tuple[float, float] = (2.0, 98.0)
) -> torch.Tensor:
    """Depth ``[H, W]`` in metres with its ``valid`` mask → the training target ``[H, W]`` in ``[-1, 1]``, near = −1.

    The low/high percentiles of the valid pixels (in the chosen space) map to −1/+1 and the rest is clipped; invalid
    pixels get whatever the clip gives and must be excluded by the mask in the loss. A sample without valid pixels is
    an error.
    """
    if not bool(valid.any()):
        raise ValueError("depth target has no valid pixel")
    mapped = depth_to_space(depth_m.to(torch.float64), space)
    # numpy's linear percentile, as the reference; torch.quantile refuses more than 2^24 values
    low, high = (float(v) for v in np.percentile(mapped[valid].cpu().numpy(), percentiles))
    spread = max(high - low, 1e-12)
    return (((mapped - low) / spread - 0.5) * 2).clamp(-1, 1).to(torch.float32)


def encode_normal_target(normals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normals ``[3, H, W]`` already in the E2P frame → ``(unit normals [3, H, W], valid [H, W])``."""
    norm = normals.norm(dim=0)
    valid = norm > NORMAL_MIN_NORM
    unit = normals / norm.clamp_min(NORMAL_MIN_NORM)
    return torch.where(valid[None], unit, torch.zeros_like(unit)), valid


def encode_alpha_target(alpha: torch.Tensor, binarize: bool = True) -> torch.Tensor:
    """Alpha in ``[0, 1]`` → ``[-1, 1]``; ``binarize`` thresholds at 0.5 first (the paper's eq. 13)."""
    if binarize:
        alpha = (alpha > 0.5).to(alpha.dtype)
    return alpha * 2 - 1
