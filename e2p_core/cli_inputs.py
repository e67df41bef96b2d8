"""Reading the command line's inputs besides the image: the matting prompt (clicks, a mask or a ready point map)
and tensors handed over in safetensors files (noise, maps). Everything is checked against the image first, so a bad
input fails before any model loads."""

from pathlib import Path

import numpy as np
import torch

from .checkpoints import load_state_dict
from .errors import InputError
from .images import reading_picture
from .pipeline import PointPrompt
from .points import parse_points, to_pixel_coords, warn_negative_points


def point_prompt(args, image_hw):
    """(PointPrompt | None, point map [H,W] | None) from --points / --point-mask / --point-map."""
    given = [flag for flag in ("points", "point_mask", "point_map") if getattr(args, flag)]
    if len(given) > 1:
        raise InputError(f"give only one of --points, --point-mask and --point-map (got {len(given)})")
    if args.points:
        text = text_or_file(args.points, "--points")
        warn_negative_points(args.negative_points or "")
        points_px = to_pixel_coords(parse_points(text), image_hw[1], image_hw[0], args.points_space)
        return PointPrompt(points_px, None, args.point_mode, args.point_sigma, args.point_radius), None
    if args.point_mask:
        mask = read_map(args.point_mask, image_hw, "point_mask")
        return PointPrompt(None, mask, "mask", args.point_sigma), None
    if args.point_map:
        return None, read_map(args.point_map, image_hw, "point_map")
    return None, None


def text_or_file(value: str, flag: str) -> str:
    """``value`` itself, or the text of the file it names. JSON too long for a file name is JSON, not an error."""
    try:
        is_file = Path(value).is_file()
    except (OSError, ValueError):  # ENAMETOOLONG, NUL characters
        is_file = False
    if not is_file:
        return value
    try:
        return Path(value).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{flag} {value}: cannot read the file as UTF-8 text ({exc})") from None


def read_map(path: str, image_hw, key: str) -> np.ndarray:
    """A map in [0,1] at the image size: a PNG (8 or 16 bit, first channel) or safetensors with ``key`` [H,W]."""
    if path.endswith(".safetensors"):
        values = read_tensor_file(path, key).float().numpy()
        while values.ndim > 2 and values.shape[0] == 1:  # tolerate [1,H,W] and [1,1,H,W]
            values = values[0]
    else:
        with reading_picture(path) as img:
            raw = np.asarray(img)
        if raw.ndim == 3:
            raw = raw[..., 0]
        values = raw.astype(np.float32) / (65535.0 if raw.dtype == np.uint16 else 255.0)
    if values.shape != tuple(image_hw):
        size = f"{values.shape[1]}x{values.shape[0]}" if values.ndim == 2 else f"of shape {list(values.shape)}"
        raise InputError(f"{path} is {size}, the image is {image_hw[1]}x{image_hw[0]} (width x height); they must "
                         f"match")
    return values


def read_tensor_file(path: str, key: str) -> torch.Tensor:
    tensors = load_state_dict(path)
    if key not in tensors:
        raise InputError(f"{path} has no tensor {key!r}; it has {sorted(tensors)[:8]}")
    return tensors[key]
