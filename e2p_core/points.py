"""Point prompts for matting: click lists -> a soft point map in [0,1] -> the second Kontext image in [-1,1].

Reproduces the reference (E2P-SPEC §2):

* ``app.py`` ``create_alpha_mask_from_points_and_brush``: alpha = 1 inside a disk around each (integer) click
  (:func:`click_region`);
* ``models/unified_dataset.py`` ``gen_points``: 10 points drawn with seed 42 among the pixels with alpha > 0.8,
  each a Gaussian normalised to peak 1, max-combined (:func:`sample_point_map`);
* the map is fed as ``map * 2 - 1`` repeated to 3 channels (:func:`encode_point_map`).

The user's clicks are therefore not Gaussian centres in the trained path; they only define where the 10 points are
sampled. :func:`gaussians_at_clicks` offers Gaussians exactly at the clicks as an intuitive, untrained alternative.
Clicks arrive in the KJNodes Points Editor / SAM2 JSON contract (COMFY-CONVENTIONS §2.5). Edit2Perceive was trained
with positive points only. Sizes default to the reference's 768-px values scaled to the processing size.
"""

import contextlib
import json
import logging
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from .errors import InputError

logger = logging.getLogger(__name__)

CoordSpace = Literal["auto", "pixels", "normalized"]
PointMapMode = Literal["app", "clicks", "mask"]
PointsLike = Sequence[tuple[float, float]] | np.ndarray
MapLike = np.ndarray | torch.Tensor

REFERENCE_SIDE_PX = 768  # the reference app's MODEL_INPUT_SIZE, at which its pixel sizes below are given
REFERENCE_SIGMA_PX = 30  # gen_points(radius=30) in app.py / inference.py
REFERENCE_DISK_RADIUS_PX = 100  # app.py point_radius
GAUSSIAN_TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter default, used by gen_points
OUTSIDE_TOLERANCE_PX = 0.5
VALUE_TOLERANCE = 1e-3
_EXPECTED_FORMAT = '\'[{"x": 512, "y": 384}, ...]\' or \'[[512, 384], ...]\''


def default_sigma_px(side: int) -> float:
    """Gaussian sigma of the reference (30 px at 768) scaled to ``side``, the longer processing side in pixels."""
    return REFERENCE_SIGMA_PX * side / REFERENCE_SIDE_PX


def default_disk_radius_px(side: int) -> float:
    """Click-disk radius of the reference app (100 px at 768) scaled to ``side``, the longer processing side."""
    return REFERENCE_DISK_RADIUS_PX * side / REFERENCE_SIDE_PX


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _coordinate(value: object, entry: object) -> float:
    # bool is an int subclass in Python; true/false are never coordinates. JSON integers have no size limit: one
    # beyond float's range is as non-finite as Infinity.
    coordinate = float("nan")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        with contextlib.suppress(OverflowError):
            coordinate = float(value)
    if not math.isfinite(coordinate):
        raise InputError(f"point {_short(json.dumps(entry))} has a non-numeric or non-finite coordinate; "
                         f"expected finite numbers as in {_EXPECTED_FORMAT}")
    return coordinate


def parse_points(text: str) -> list[tuple[float, float]]:
    """Parse a point list string into (x, y) tuples, in the units given (pixels or normalized).

    Accepts the KJNodes Points Editor / SAM2 format ``[{"x": 512, "y": 384}, ...]`` (single quotes tolerated, as
    SAM2 parses it) and ``[[x, y], ...]``. An empty string, whitespace, ``[]`` and a JSON-quoted string of these
    (KJNodes' Points Editor writes ``""`` for an empty negative list) mean no points.
    """
    if not isinstance(text, str):
        raise InputError(f"points must be a JSON string, got {type(text).__name__}; expected {_EXPECTED_FORMAT}")
    data = _decode_point_json(text)
    if isinstance(data, str):  # JSON text quoted once more, as KJNodes' '""'
        data = _decode_point_json(data)
    if data is None:
        return []
    if not isinstance(data, list):
        raise InputError(f"points {_short(text)!r} are not a list; expected {_EXPECTED_FORMAT}")
    points = []
    for entry in data:
        if isinstance(entry, dict):
            if "x" not in entry or "y" not in entry:
                raise InputError(f"point {_short(json.dumps(entry))} lacks an 'x' or 'y' key; "
                                 f"expected {_EXPECTED_FORMAT}")
            x, y = entry["x"], entry["y"]
        elif isinstance(entry, list) and len(entry) == 2:
            x, y = entry
        else:
            raise InputError(f"point {_short(json.dumps(entry))} is neither {{\"x\": .., \"y\": ..}} nor [x, y]; "
                             f"expected {_EXPECTED_FORMAT}")
        points.append((_coordinate(x, entry), _coordinate(y, entry)))
    return points


def _decode_point_json(text: str) -> object:
    """The JSON value of ``text`` (None when it is blank), or an InputError quoting it."""
    if not text.strip():
        return None
    try:
        return json.loads(text.replace("'", '"'))
    except (ValueError, RecursionError) as err:  # ValueError also: an integer of more than 4300 digits
        reason = err.msg if isinstance(err, json.JSONDecodeError) else "too long a number or too deep a nesting"
        raise InputError(f"points {_short(text)!r} are not valid JSON ({reason}); "
                         f"expected {_EXPECTED_FORMAT}") from None


def warn_negative_points(text: str) -> int:
    """Parse negative points only to warn that they are ignored; returns how many were given."""
    count = len(parse_points(text))
    if count:
        logger.warning("%d negative point(s) ignored: Edit2Perceive was trained on positive points only", count)
    return count


def _as_points_array(points: PointsLike) -> np.ndarray:
    array = np.asarray(points, dtype=np.float64)
    if array.size == 0:
        return np.zeros((0, 2), dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 2:
        raise InputError(f"points have shape {array.shape}; expected [N,2] (x, y) pairs")
    if not np.isfinite(array).all():
        raise InputError("points contain NaN or infinite coordinates; expected finite (x, y) pairs")
    return array


def to_pixel_coords(points: PointsLike, width: int, height: int, space: CoordSpace = "auto") -> np.ndarray:
    """(x, y) points -> float64 [N,2] pixel coordinates (origin top-left, y down) of a ``width x height`` image.

    ``normalized`` means x*width, y*height. ``auto`` treats the points as normalized iff every coordinate lies in
    [0, 1], else as pixels (so a pixel prompt made only of points within one pixel of the origin is misread; pick
    ``pixels`` explicitly there). Points beyond the image [0, width] x [0, height] by more than 0.5 px are errors.
    """
    given = _as_points_array(points)
    if space == "auto":
        space = "normalized" if given.size and ((given >= 0) & (given <= 1)).all() else "pixels"
    if space == "normalized":
        pixels = given * np.array([width, height], dtype=np.float64)
    elif space == "pixels":
        pixels = given.copy()
    else:
        raise InputError(f"unknown coordinate space {space!r}; expected 'auto', 'pixels' or 'normalized'")
    for (x, y), original in zip(pixels, given):
        if not (-OUTSIDE_TOLERANCE_PX <= x <= width + OUTSIDE_TOLERANCE_PX
                and -OUTSIDE_TOLERANCE_PX <= y <= height + OUTSIDE_TOLERANCE_PX):
            raise InputError(f"point ({original[0]:g}, {original[1]:g}) read as {space} lies outside the "
                             f"{width}x{height} image; expected 0 <= x <= {width}, 0 <= y <= {height} in pixels "
                             f"or 0..1 normalized")
    return pixels


def scale_coords(points_px: PointsLike, from_hw: tuple[int, int], to_hw: tuple[int, int]) -> np.ndarray:
    """Map pixel points from an image of ``from_hw`` to one of ``to_hw`` (both (height, width), padding excluded).

    Computed as ``x * to_w / from_w`` like app.py's ``int(x * 768 / W)``: multiplying first keeps exact integers
    exact, so the truncation in :func:`click_region` lands on the same pixel as the reference.
    """
    pixels = _as_points_array(points_px)
    return pixels * np.array([to_hw[1], to_hw[0]], dtype=np.float64) / np.array([from_hw[1], from_hw[0]])


def click_region(points_px: PointsLike, height: int, width: int, radius_px: float) -> np.ndarray:
    """app.py click disks: float32 [H,W] ``alpha``, 1 where ``(col-x)^2 + (row-y)^2 <= r^2`` around a click, else 0.

    Clicks are truncated to integers first, as app.py does (identical to cv2.circle filled disks for integer r).
    """
    alpha = np.zeros((height, width), dtype=np.float32)
    rows = np.arange(height)[:, None]
    cols = np.arange(width)[None, :]
    for x, y in np.trunc(_as_points_array(points_px)).astype(np.int64):
        alpha[(cols - x) ** 2 + (rows - y) ** 2 <= radius_px * radius_px] = 1.0
    return alpha


def _unit_gaussian_blob(height: int, width: int, row: int, col: int, sigma_px: float) -> np.ndarray:
    """gen_points' blob ``g = gaussian_filter(impulse, sigma); g / g.max()`` as float32 [H,W], computed only on the
    window the truncated kernel reaches.

    Bit-exact with filtering the whole image: outside the window the filter sums only zeros, inside it the same taps
    are summed (real image borders still reflect; the window's inner edges are too far away to reflect the impulse
    back), and it is many times faster at large sizes.
    """
    reach = int(GAUSSIAN_TRUNCATE * sigma_px + 0.5)  # scipy's kernel radius
    top, bottom = max(0, row - reach), min(height, row + reach + 1)
    left, right = max(0, col - reach), min(width, col + reach + 1)
    impulse = np.zeros((bottom - top, right - left), dtype=np.float32)
    impulse[row - top, col - left] = 1.0
    window = gaussian_filter(impulse, sigma=sigma_px, mode="reflect", truncate=GAUSSIAN_TRUNCATE)
    blob = np.zeros((height, width), dtype=np.float32)
    blob[top:bottom, left:right] = window / window.max()
    return blob


def _as_map(values: MapLike, what: str) -> np.ndarray:
    array = values.detach().cpu().float().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if array.ndim != 2 or array.size == 0:
        raise InputError(f"{what} has shape {tuple(array.shape)}; expected one non-empty [H,W] map with values in "
                         f"[0, 1]")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise InputError(f"{what} contains NaN or infinite values; expected values in [0, 1]")
    return array


def sample_point_map(
    region_alpha: MapLike,
    num_points: int = 10,
    sigma_px: float | None = None,
    threshold: float = 0.8,
    seed: int = 42,
) -> tuple[np.ndarray, np.ndarray]:
    """The reference ``gen_points``: -> (``point_map`` float32 [H,W] in [0,1], ``coords_norm`` float32 [2*num_points]).

    ``num_points`` pixels with ``region_alpha > threshold`` are drawn without replacement by a fresh
    ``RandomState(seed)`` (the stream of the reference's global ``np.random.seed(42)`` + ``np.random.choice``,
    without touching numpy's global state). Each becomes a Gaussian of ``sigma_px`` (default: 30 px at 768)
    normalised to peak 1; blobs are max-combined. ``coords_norm`` is ``[x1/W, y1/H, ...]``. With fewer foreground
    pixels than ``num_points`` the map and coordinates are all zero, as in the reference.
    """
    alpha = _as_map(region_alpha, "region alpha")
    height, width = alpha.shape
    if sigma_px is None:
        sigma_px = default_sigma_px(max(height, width))
    if num_points < 1 or sigma_px <= 0:
        raise InputError(f"num_points={num_points}, sigma_px={sigma_px}; expected num_points >= 1 and sigma_px > 0")
    rows, cols = np.where(alpha > threshold)  # row-major order, as the reference
    point_map = np.zeros((height, width), dtype=np.float32)
    if len(rows) < num_points:
        logger.warning("only %d pixel(s) above %.2f in the point region, %d needed: the point map is empty",
                       len(rows), threshold, num_points)
        return point_map, np.zeros(2 * num_points, dtype=np.float32)
    chosen = np.random.RandomState(seed).choice(len(rows), num_points, replace=False)
    for index in chosen:
        np.maximum(point_map, _unit_gaussian_blob(height, width, rows[index], cols[index], sigma_px), out=point_map)
    coords_norm = np.stack([cols[chosen] / width, rows[chosen] / height], axis=1).reshape(-1).astype(np.float32)
    return point_map, coords_norm


def gaussians_at_clicks(points_px: PointsLike, height: int, width: int, sigma_px: float) -> np.ndarray:
    """float32 [H,W] ``point_map``: a peak-1 Gaussian of ``sigma_px`` centred exactly at each click, max-combined.

    Intuitive but not what Edit2Perceive was trained with (see :func:`sample_point_map`).
    """
    if sigma_px <= 0:
        raise InputError(f"sigma_px is {sigma_px}; expected a positive Gaussian sigma in pixels")
    point_map = np.zeros((height, width), dtype=np.float32)
    rows, cols = np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64)
    for x, y in _as_points_array(points_px):
        # A 2-D isotropic Gaussian is the outer product of two 1-D ones: cheap even for large maps.
        blob = np.outer(np.exp(-((rows - y) ** 2) / (2 * sigma_px**2)), np.exp(-((cols - x) ** 2) / (2 * sigma_px**2)))
        np.maximum(point_map, blob.astype(np.float32), out=point_map)
    return point_map


def build_point_map(
    mode: PointMapMode,
    height: int,
    width: int,
    points_px: PointsLike | None = None,
    mask: MapLike | None = None,
    sigma_px: float | None = None,
    radius_px: float | None = None,
    num_points: int = 10,
    seed: int = 42,
) -> np.ndarray:
    """float32 [H,W] ``point_map`` in [0,1] at the processing size (before padding).

    * ``app`` (default path of the reference app): disks of ``radius_px`` around the clicks, then
      :func:`sample_point_map`;
    * ``clicks``: :func:`gaussians_at_clicks` (not trained);
    * ``mask``: :func:`sample_point_map` of a user ``mask`` [H,W] (the training path: points where mask > 0.8).

    ``sigma_px`` and ``radius_px`` default to the reference's 768-px sizes scaled to max(height, width).
    """
    side = max(height, width)
    sigma_px = default_sigma_px(side) if sigma_px is None else sigma_px
    if mode == "mask":
        if mask is None:
            raise InputError("point map mode 'mask' needs a mask; expected a [H,W] mask with values in [0, 1]")
        mask_array = _as_map(mask, "mask")
        if mask_array.shape != (height, width):
            raise InputError(f"mask is {mask_array.shape[1]}x{mask_array.shape[0]}; expected {width}x{height} "
                             f"(width x height, the processing size)")
        return sample_point_map(mask_array, num_points=num_points, sigma_px=sigma_px, seed=seed)[0]
    if mode not in ("app", "clicks"):
        raise InputError(f"unknown point map mode {mode!r}; expected 'app', 'clicks' or 'mask'")
    clicks = _as_points_array([] if points_px is None else points_px)
    if len(clicks) == 0:
        logger.warning("no points given: the point map is empty (the reference then feeds -1 everywhere)")
        return np.zeros((height, width), dtype=np.float32)
    if mode == "clicks":
        return gaussians_at_clicks(clicks, height, width, sigma_px)
    radius_px = default_disk_radius_px(side) if radius_px is None else radius_px
    region = click_region(clicks, height, width, radius_px)
    return sample_point_map(region, num_points=num_points, sigma_px=sigma_px, seed=seed)[0]


def encode_point_map(point_map: MapLike) -> torch.Tensor:
    """``point_map`` [H,W] in [0,1] -> float32 [3,H,W] in [-1,1]: ``map * 2 - 1`` repeated to 3 channels."""
    array = _as_map(point_map, "point map")
    low, high = float(array.min()), float(array.max())
    if low < -VALUE_TOLERANCE or high > 1 + VALUE_TOLERANCE:
        raise InputError(f"point map has values in [{low:.4g}, {high:.4g}]; expected values in [0, 1]")
    unit = torch.from_numpy(np.clip(array, 0.0, 1.0))
    return (unit * 2 - 1)[None].repeat(3, 1, 1)
