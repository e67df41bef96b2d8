"""Reading one file of a training pair the way the reference loader does (E2P-SPEC §1.3, §4.4-§4.6).

Every reader resizes to the training ``size_hw`` = (height, width) without keeping the aspect ratio, as the reference
does for all datasets. Values come back in physical units: RGB in [-1, 1], depth in metres (with the source's validity
range applied *after* the resize, as the reference masks the resized map), normals in the E2P frame, alpha in [0, 1].
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from e2p_core.conventions import normals_from_convention
from e2p_core.errors import InputError

KITTI_CROP_WH = (1216, 352)  # the reference's bottom-centre crop of Virtual KITTI frames


def kitti_crop(image: Image.Image, path: Path) -> Image.Image:
    """Bottom-centre crop to 1216×352 (the KITTI benchmark crop the reference applies to Virtual KITTI 2)."""
    width, height = image.size
    crop_w, crop_h = KITTI_CROP_WH
    if width < crop_w or height < crop_h:
        raise InputError(f"{path} is {width}x{height}; Virtual KITTI frames must be at least "
                         f"{crop_w}x{crop_h} for the bottom-centre crop")
    left, top = (width - crop_w) // 2, height - crop_h
    return image.crop((left, top, left + crop_w, top + crop_h))


def _open(path: Path, crop: bool) -> Image.Image:
    image = Image.open(path)
    image.load()  # decode now, so a truncated file fails here, inside the sample's error handling
    return kitti_crop(image, path) if crop else image


def read_rgb(path: Path, size_hw: tuple[int, int], crop: bool = False) -> torch.Tensor:
    """RGB file → float32 [3,H,W] in [-1,1]: ``convert("RGB")``, PIL bilinear resize, ``x/255·2 − 1``."""
    image = _open(path, crop).convert("RGB").resize(size_hw[::-1], Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1) * 2 - 1


def read_depth_png(path: Path, size_hw: tuple[int, int], units_per_metre: float, crop: bool = False) -> np.ndarray:
    """uint16 depth PNG → float32 [H,W] metres, resized first with PIL's default filter (bicubic), as the reference."""
    image = _open(path, crop)
    if image.mode not in ("I;16", "I;16B", "I"):
        raise InputError(f"{path} has PIL mode {image.mode}; expected a 16-bit depth PNG")
    resized = image.resize(size_hw[::-1])
    return np.asarray(resized, dtype=np.float32) / units_per_metre


def read_depth_npy(path: Path, size_hw: tuple[int, int]) -> np.ndarray:
    """float [H,W] depth ``.npy`` in metres → float32 [H,W]; non-finite pixels become 0 (invalid) before the resize."""
    depth = np.load(path, allow_pickle=False)
    if depth.ndim != 2:
        raise InputError(f"{path} holds an array of shape {depth.shape}; expected [H,W] depth in metres")
    depth = np.where(np.isfinite(depth), depth, 0).astype(np.float32)
    return np.array(Image.fromarray(depth).resize(size_hw[::-1], Image.Resampling.BICUBIC))


def depth_validity(depth_m: np.ndarray, low_m: float, high_m: float) -> np.ndarray:
    """bool [H,W]: ``low_m < depth < high_m`` (strict on both sides, as the reference)."""
    return (depth_m > low_m) & (depth_m < high_m)


def read_normals_npy(path: Path, size_hw: tuple[int, int]) -> torch.Tensor:
    """float [H,W,3] normals ``.npy`` in the OpenGL camera frame → float32 [3,H,W] in the E2P frame (not unit yet).

    As the reference: ``cv2.resize`` with ``INTER_LINEAR_EXACT`` and x negated (OpenGL +x right → E2P +x left; the
    reference negates before the resize, which is the same as both are linear).
    """
    normals = np.load(path, allow_pickle=False)
    if normals.ndim != 3 or normals.shape[2] != 3:
        raise InputError(f"{path} holds an array of shape {normals.shape}; expected [H,W,3] camera-space normals")
    normals = np.where(np.isfinite(normals), normals, 0).astype(np.float32)  # NaN → invalid pixel (norm 0)
    normals = cv2.resize(normals, size_hw[::-1], interpolation=cv2.INTER_LINEAR_EXACT)
    normals_opengl = torch.from_numpy(np.ascontiguousarray(normals)).permute(2, 0, 1)
    return normals_from_convention(normals_opengl[None], "opengl")[0]


def read_alpha(path: Path, size_hw: tuple[int, int]) -> np.ndarray:
    """Alpha matte (8-bit or 16-bit grey, or RGB) → float32 [H,W] in [0,1], PIL bilinear resize as the reference."""
    image = _open(path, crop=False)
    if image.mode in ("I;16", "I;16B", "I"):
        resized = image.convert("I").resize(size_hw[::-1], Image.Resampling.BILINEAR)
        return np.clip(np.asarray(resized, dtype=np.float32) / 65535, 0, 1)
    resized = image.convert("L").resize(size_hw[::-1], Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32) / 255
