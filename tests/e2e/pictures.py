"""Pictures made from numbers for the end-to-end tests and the example workflows' thumbnails (no files needed)."""

from __future__ import annotations

import numpy as np


def scene(width: int, height: int) -> np.ndarray:
    """A sky-to-ground gradient with a bright disk (the "subject") left of centre; uint8 [H, W, 3]."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    sky = np.stack([60 + 100 * y / height, 90 + 80 * y / height, 200 - 120 * y / height], axis=-1)
    disk = (x - 0.35 * width) ** 2 + (y - 0.55 * height) ** 2 < (0.25 * height) ** 2
    sky[disk] = (230, 120, 40)
    return sky.clip(0, 255).astype(np.uint8)


def background(width: int, height: int) -> np.ndarray:
    """A red-green ramp on blue; uint8 [H, W, 3]."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // (width - 1), y * 255 // (height - 1), np.full_like(x, 160)], axis=-1).astype(np.uint8)
