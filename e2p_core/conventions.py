"""Output conventions: depth polarity and normalisation, normal-map axes, alpha.

What the model produces (the reference conventions, see ``e2p_core.pipeline``):
* ``depth_affine01``: affine-invariant depth (the model was trained on p2/p98-normalised sqrt depth), in [0,1],
  near = 0, far = 1. ControlNet depth models want the opposite, near = white: :func:`depth_hint`.
* ``normals_e2p``: unit normals in the training frame. The training targets are Hypersim camera normals
  (OpenGL camera: +x right, +y up, +z toward the viewer) with x negated, so the frame is +x LEFT, +y up,
  +z toward the camera -- the ControlNet ``normalbae`` convention (COMFY-CONVENTIONS §2.3).
* ``alpha`` in [0,1], 1 = foreground: a ComfyUI MASK as is.
"""

from typing import Literal

import torch

from .errors import InputError

DepthPolarity = Literal["near_black", "near_white"]
DepthNormalization = Literal["none", "minmax", "percentile", "sequence"]
NormalConvention = Literal["controlnet_bae", "opengl", "directx"]

# Sign of each axis relative to the E2P frame (+x left, +y up, +z toward the camera).
NORMAL_AXIS_SIGNS: dict[str, tuple[float, float, float]] = {
    "controlnet_bae": (1.0, 1.0, 1.0),  # R = +x left, G = +y up, B = +z toward the camera
    "opengl": (-1.0, 1.0, 1.0),  # +x right, +y up, +z toward the viewer (Blender camera, Marigold)
    "directx": (-1.0, -1.0, 1.0),  # +x right, +y down, +z toward the viewer
}
PERCENTILES = (0.02, 0.98)  # the robust range the training targets were normalised with
EPS = 1e-8


def normalize_depth(depth: torch.Tensor, mode: DepthNormalization = "none") -> torch.Tensor:
    """Stretch [B,1,H,W] depth to [0,1]: per frame (``minmax``, ``percentile`` = 2nd..98th, clipped), over the
    whole batch (``sequence``: one range for a video, no flicker), or not at all (``none``)."""
    if mode == "none":
        return depth
    if mode == "sequence":
        low, high = depth.amin(), depth.amax()
    elif mode == "minmax":
        low, high = depth.amin(dim=(1, 2, 3), keepdim=True), depth.amax(dim=(1, 2, 3), keepdim=True)
    elif mode == "percentile":
        flat = depth.flatten(1).float()
        low, high = (torch.quantile(flat, q, dim=1).view(-1, 1, 1, 1) for q in PERCENTILES)
    else:
        raise InputError(f"depth normalization must be none, minmax, percentile or sequence, got {mode!r}")
    return ((depth - low) / (high - low).clamp_min(EPS)).clamp(0, 1)


def depth_hint(depth_affine01: torch.Tensor, polarity: DepthPolarity = "near_white") -> torch.Tensor:
    """Depth for ControlNet: ``near_white`` (ControlNet's convention) = 1 - depth; ``near_black`` = as predicted."""
    if polarity == "near_white":
        return 1.0 - depth_affine01
    if polarity == "near_black":
        return depth_affine01
    raise InputError(f"depth polarity must be near_white or near_black, got {polarity!r}")


def _axis_signs(convention: str, like: torch.Tensor) -> torch.Tensor:
    if convention not in NORMAL_AXIS_SIGNS:
        raise InputError(f"normal convention must be one of {sorted(NORMAL_AXIS_SIGNS)}, got {convention!r}")
    return torch.tensor(NORMAL_AXIS_SIGNS[convention], dtype=like.dtype, device=like.device).view(1, 3, 1, 1)


def normals_to_convention(normals_e2p: torch.Tensor, convention: NormalConvention = "controlnet_bae") -> torch.Tensor:
    """[B,3,H,W] unit normals from the E2P frame into ``convention`` (a sign flip per axis)."""
    return normals_e2p * _axis_signs(convention, normals_e2p)


def normals_from_convention(normals: torch.Tensor, convention: NormalConvention) -> torch.Tensor:
    """Inverse of :func:`normals_to_convention` (each flip is its own inverse)."""
    return normals * _axis_signs(convention, normals)


def normals_to_rgb01(normals: torch.Tensor) -> torch.Tensor:
    """The universal normal-map encoding ``(n + 1) / 2`` in [0,1]; channels stay in RGB order."""
    return ((normals + 1) / 2).clamp(0, 1)
