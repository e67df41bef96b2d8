"""High-resolution tiling: a global pass plus overlapping tiles at the processing size over the full-size image.

The model sees 768 px; a 4K still squeezed to 768 loses its detail. Tiling runs the model once on the whole image
(the global pass, for layout) and once per overlapping tile cut from the full-resolution image, then merges:

* depth: each tile's prediction is affine-invariant with its own scale and shift (in the sqrt-depth space the model
  was trained in), so it is fitted by least squares (``e2p_core.alignment``) to the global prediction upsampled to
  full size, on pixels clipped in neither, before blending;
* normals: blended as vectors and renormalised;
* matting: each tile gets the point prompt mapped into its own pixels (clicks shifted, masks and maps cropped);
* every blend uses feathered weights that fall to zero toward a tile edge shared with another tile, so no seam shows.

``perceive_tiled`` takes any ``perceiver(image, points, point_map) -> [C,H,W]`` at the image's own size, so the
merge is tested with a stand-in and runs the real pipeline unchanged. DiT calls: ``1 + rows * cols`` per frame
(times the steps).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from .alignment import fit_scale_shift
from .errors import InputError
from .pipeline import PointPrompt

DEFAULT_OVERLAP = 0.25  # share of a tile's side shared with its neighbour
CLIP_MARGIN = 1e-3  # depth values within this of 0 or 1 were clipped by the model

Perceiver = Callable[[np.ndarray, PointPrompt | None, np.ndarray | None], torch.Tensor]


@dataclass(frozen=True)
class Tile:
    """A window of the full-size image, in pixels."""

    top: int
    left: int
    height: int
    width: int

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.top, self.top + self.height), slice(self.left, self.left + self.width)


def auto_tiles(image_hw: tuple[int, int], resolution: int, overlap: float = DEFAULT_OVERLAP) -> int:
    """Tiles along the longer side so each tile is about ``resolution`` px of the full image (0 below that)."""
    longer = max(image_hw)
    if longer <= resolution:
        return 0
    return math.ceil((longer - resolution) / (resolution * (1 - overlap))) + 1


def plan_tiles(image_hw: tuple[int, int], tiles: int, overlap: float = DEFAULT_OVERLAP) -> list[Tile]:
    """``tiles`` square tiles along the longer side (as many as needed along the shorter one), evenly spaced and
    overlapping by ``overlap`` of their side; ``tiles`` < 2 plans no tiling."""
    if not 0 <= overlap < 1:
        raise InputError(f"tile overlap must be in [0, 1), got {overlap}")
    if tiles < 2:
        return []
    height, width = image_hw
    side = min(math.ceil(max(image_hw) / (tiles - (tiles - 1) * overlap)), min(image_hw))
    rows = _starts(height, side, overlap)
    cols = _starts(width, side, overlap)
    return [Tile(top, left, min(side, height), min(side, width)) for top in rows for left in cols]


def _starts(length: int, side: int, overlap: float) -> list[int]:
    if side >= length:
        return [0]
    count = math.ceil((length - side) / (side * (1 - overlap))) + 1
    return [round(i * (length - side) / (count - 1)) for i in range(count)]


def feather_weights(tile: Tile, image_hw: tuple[int, int], ramp_px: int) -> torch.Tensor:
    """[h,w] weights of one tile: a linear ramp from ~0 to 1 over ``ramp_px`` toward each edge inside the image; edges
    on the image border keep full weight (nothing else covers them)."""
    rows = _ramp(tile.height, ramp_px, tile.top > 0, tile.top + tile.height < image_hw[0])
    cols = _ramp(tile.width, ramp_px, tile.left > 0, tile.left + tile.width < image_hw[1])
    return rows[:, None] * cols[None, :]


def _ramp(length: int, ramp_px: int, fade_start: bool, fade_end: bool) -> torch.Tensor:
    position = torch.arange(length, dtype=torch.float64) + 0.5
    weight = torch.ones(length, dtype=torch.float64)
    ramp = max(ramp_px, 1)
    if fade_start:
        weight = torch.minimum(weight, position / ramp)
    if fade_end:
        weight = torch.minimum(weight, (length - position) / ramp)
    return weight.clamp_min(1e-3)


def perceive_tiled(
    perceiver: Perceiver,
    image: np.ndarray,
    task: str,
    tiles: int,
    *,
    overlap: float = DEFAULT_OVERLAP,
    points: PointPrompt | None = None,
    point_map: np.ndarray | None = None,
    on_tile: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """One frame ``image`` [H,W,3] → the merged prediction [C,H,W] (float32) at exactly H x W.

    ``perceiver`` runs the model on an image of any size and returns its output at that size; it is called
    ``1 + len(plan_tiles(...))`` times. ``on_tile(i, n)`` runs before each call.
    """
    image_hw = tuple(image.shape[:2])
    plan = plan_tiles(image_hw, tiles, overlap)
    calls = 1 + len(plan)
    if on_tile is not None:
        on_tile(0, calls)
    global_pass = perceiver(image, points, point_map).float()  # [C,H,W], upsampled by the pipeline's restore
    if not plan:
        return global_pass
    ramp_px = max(1, round(overlap * plan[0].height / 2)) if overlap > 0 else 1
    detail_ratio = max(1, round(max(image_hw) / max(plan[0].height, plan[0].width)))
    merged = torch.zeros(global_pass.shape, dtype=torch.float64)
    total_weight = torch.zeros(image_hw, dtype=torch.float64)
    for index, tile in enumerate(plan, start=1):
        if on_tile is not None:
            on_tile(index, calls)
        rows, cols = tile.slices
        crop = np.ascontiguousarray(image[rows, cols])
        prediction = perceiver(crop, _tile_points(points, tile), _crop(point_map, tile)).double()  # [C,h,w]
        if task == "depth":
            prediction = _align_depth_tile(prediction, global_pass[:, rows, cols].double(), detail_ratio)
        weight = feather_weights(tile, image_hw, ramp_px)
        merged[:, rows, cols] += prediction * weight
        total_weight[rows, cols] += weight
    merged = merged / total_weight
    if task == "normal":
        merged = merged / (merged.norm(dim=0, keepdim=True) + 1e-8)  # a blend of unit vectors is shorter
    elif task in ("depth", "matting"):
        merged = merged.clamp(0, 1)
    return merged.float()


def _align_depth_tile(tile_depth: torch.Tensor, global_depth: torch.Tensor, detail_ratio: int) -> torch.Tensor:
    """The tile's depth [1,h,w] mapped by least squares onto the global pass there, on pixels clipped in neither.

    The global pass resolves ``detail_ratio`` times fewer pixels: the fit compares both at that resolution (area
    means), or the detail only the tile sees would act as noise and shrink the fitted scale.
    """
    clipped = lambda x: ((x <= CLIP_MARGIN) | (x >= 1 - CLIP_MARGIN)).double()  # noqa: E731
    pool = lambda x: F.avg_pool2d(x[None], detail_ratio, ceil_mode=True)[0]  # noqa: E731
    touched = F.max_pool2d(torch.maximum(clipped(tile_depth), clipped(global_depth))[None], detail_ratio,
                           ceil_mode=True)[0]
    valid = touched == 0
    if int(valid.sum()) < 2:
        return global_depth  # nothing to fit on: the global pass is all we know there
    scale, shift = fit_scale_shift(pool(tile_depth), pool(global_depth), valid)
    if float(scale) <= 0:
        return global_depth
    return tile_depth * scale + shift


def _tile_points(points: PointPrompt | None, tile: Tile) -> PointPrompt | None:
    """The point prompt in the tile's pixels: clicks shifted (those outside still reach in with their Gaussians),
    a mask cropped."""
    if points is None:
        return None
    clicks = None if points.points_px is None else points.points_px - np.array([tile.left, tile.top])
    return replace(points, points_px=clicks, mask=_crop(points.mask, tile))


def _crop(values: np.ndarray | torch.Tensor | None, tile: Tile):
    if values is None:
        return None
    rows, cols = tile.slices
    return values[..., rows, cols]
