"""Image loading, preprocessing for the model, and restoring outputs to the input size.

Reproduces the reference preprocessing (E2P-SPEC §1.3): PIL ``Image.resize((W, H), BILINEAR)`` on the uint8 RGB
image (antialiased when downscaling), then ``TF.to_tensor(img) * 2 - 1``, i.e. ``x / 255`` in float32 mapped to
[-1, 1]. For uint8 input the result is bit-exact with the reference.

Two resize modes, planned once per image as a :class:`Geometry`:

* ``reference``: squash to ``resolution x resolution`` ignoring the aspect ratio, as every official entry point does.
* ``aligned`` (the product default): keep the aspect ratio, scale so the longer side equals ``resolution``
  (Marigold's ``processing_resolution`` convention), then pad bottom/right with edge pixels up to multiples of 16.

``resolution="native"`` processes at the input size, only padded to multiples of 16. The model needs H and W
divisible by 16 (VAE /8, then 2x2 patchify). :func:`restore` crops the padding and resizes the output back to the
exact input H x W (the reference app resizes back too, with NEAREST; bilinear is used here).
"""

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .errors import InputError

logger = logging.getLogger(__name__)

ResizeMode = Literal["aligned", "reference"]
Resolution = int | Literal["native"]
ImageLike = np.ndarray | torch.Tensor

MIN_SIDE_PX = 16
MAX_FILE_SIDE_PX = 16384
# Context tokens get RoPE ids (1, row, col) that the reference computes in bf16; bf16 holds every integer up to 256
# exactly, and one token covers 16 px, so sides above 4096 px would get rounded (colliding) position ids.
MAX_MODEL_SIDE_PX = 4096
MIN_RESOLUTION = 64
MULTIPLE_OF = 16  # VAE downsamples by 8, then 2x2 patchify
VALUE_TOLERANCE = 1e-3  # float inputs may overshoot [0, 1] by this much (resampling ringing, rounding)

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


@dataclass(frozen=True)
class Geometry:
    """How one image is brought to the model and back. All sizes are (height, width) in pixels.

    ``resized_hw`` is the content size after resizing; ``padded_hw`` adds bottom/right padding up to multiples of 16
    and is what the model sees.
    """

    input_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    padded_hw: tuple[int, int]
    mode: ResizeMode


def check_image_size(height: int, width: int) -> None:
    """Reject images too small to be meaningful or too large to be a sane input."""
    if height < MIN_SIDE_PX or width < MIN_SIDE_PX:
        raise InputError(f"image is {width}x{height}; at least {MIN_SIDE_PX}x{MIN_SIDE_PX} needed")
    if height > MAX_FILE_SIDE_PX or width > MAX_FILE_SIDE_PX:
        raise InputError(f"image is {width}x{height}; at most {MAX_FILE_SIDE_PX} px per side is supported")


def load_image_rgb(path: str | os.PathLike, apply_exif_orientation: bool = True) -> np.ndarray:
    """Read an image file as uint8 RGB [H,W,3].

    Alpha is dropped like the reference's ``.convert("RGB")`` (with a warning). 16-bit grayscale is scaled to 8 bit
    (``.convert("RGB")`` would clip it to white). The EXIF orientation is applied by default, as ComfyUI's LoadImage
    does; the reference does not, so pass ``apply_exif_orientation=False`` to reproduce it on rotated photos.
    """
    with reading_picture(path) as img:
        check_image_size(img.height, img.width)
        if apply_exif_orientation:
            img = ImageOps.exif_transpose(img)
        return _pil_to_rgb_uint8(img, str(path))


@contextlib.contextmanager
def reading_picture(path: str | os.PathLike) -> Iterator[Image.Image]:
    """``Image.open(path)`` for the body of a ``with``; every failure there, while opening or decoding a missing,
    damaged or foreign file, becomes an InputError naming the file."""
    try:
        with Image.open(path) as img:
            yield img
    except FileNotFoundError:
        raise InputError(f"image file {str(path)!r} does not exist") from None
    except Image.DecompressionBombError as err:
        raise InputError(f"image file {str(path)!r} is too large to decode safely ({err})") from None
    except InputError as err:
        raise InputError(f"image file {str(path)!r}: {err}") from None
    except Exception as err:  # Pillow's decoders fail on damaged files with OSError, ValueError, SyntaxError, ...
        raise InputError(f"cannot read {str(path)!r} as an image (PNG, JPEG, WebP, ...): {err}") from None


def _pil_to_rgb_uint8(img: Image.Image, name: str) -> np.ndarray:
    has_alpha = img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        logger.warning("%s: the alpha channel was ignored (Edit2Perceive reads RGB only)", name)
    if img.mode in _SIXTEEN_BIT_MODES:
        gray16 = np.clip(np.asarray(img, dtype=np.float64), 0, 65535)
        gray8 = np.round(gray16 / 257.0).astype(np.uint8)
        return np.repeat(gray8[:, :, None], 3, axis=2)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def _to_numpy(values: ImageLike) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        # numpy has no bfloat16; float16/bfloat16 frames are widened losslessly.
        return (values.float() if values.is_floating_point() else values).numpy()
    return np.asarray(values)


def _as_hwc(image: ImageLike) -> np.ndarray:
    """[H,W,3] (or RGBA [H,W,4], alpha dropped) numpy view of a numpy array or torch tensor."""
    array = _to_numpy(image)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise InputError(f"image has shape {tuple(array.shape)}; expected one frame [H,W,3] (RGB)")
    if array.shape[2] == 4:
        logger.warning("the alpha channel of a 4-channel image was ignored (Edit2Perceive reads RGB only)")
        array = array[:, :, :3]
    if array.dtype != np.uint8 and not np.issubdtype(array.dtype, np.floating):
        raise InputError(f"image has dtype {array.dtype}; expected uint8 (0..255) or float (0..1)")
    return array


def _checked_unit_floats(values: np.ndarray, what: str) -> np.ndarray:
    """float32 copy of ``values`` clamped to [0, 1]; NaN/inf or values clearly outside [0, 1] are errors."""
    values = values.astype(np.float32)
    if not np.isfinite(values).all():
        raise InputError(f"{what} contains NaN or infinite values; expected floats in [0, 1]")
    low, high = float(values.min()), float(values.max())
    if low < -VALUE_TOLERANCE or high > 1 + VALUE_TOLERANCE:
        raise InputError(f"{what} has values in [{low:.4g}, {high:.4g}]; expected floats in [0, 1]")
    return np.clip(values, 0.0, 1.0)


def to_model_pixels(image: ImageLike) -> torch.Tensor:
    """uint8 [H,W,3] or float [H,W,3] in [0,1] -> float32 ``pixels`` [3,H,W] in [-1,1].

    uint8 follows torchvision ``to_tensor`` (``.div(255)`` in float32) then ``*2-1``, so it is bit-exact with the
    reference. Float input is a ComfyUI IMAGE frame.
    """
    array = _as_hwc(image)
    if array.dtype == np.uint8:
        # torchvision to_tensor: copy, HWC -> CHW, float32, .div(255).
        unit = torch.from_numpy(np.array(array, copy=True)).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    else:
        unit = torch.from_numpy(_checked_unit_floats(array, "image")).permute(2, 0, 1).contiguous()
    return unit * 2 - 1


def _round_half_up(value: float) -> int:
    return math.floor(value + 0.5)


def _pad_up(side: int) -> int:
    return -(-side // MULTIPLE_OF) * MULTIPLE_OF


def plan_geometry(input_hw: tuple[int, int], mode: ResizeMode = "aligned", resolution: Resolution = 768) -> Geometry:
    """Plan the resize and padding that take an image of ``input_hw`` (height, width) to the model and back."""
    height, width = (int(side) for side in input_hw)
    check_image_size(height, width)
    if mode not in ("aligned", "reference"):
        raise InputError(f"unknown resize mode {mode!r}; expected 'aligned' or 'reference'")

    if resolution == "native":
        if max(height, width) > MAX_MODEL_SIDE_PX:
            raise InputError(
                f"image is {width}x{height}; native processing is limited to {MAX_MODEL_SIDE_PX} px per side "
                f"(bf16 RoPE position ids are exact only up to there); choose a resolution such as 1024 or 2048"
            )
        resized_hw = (height, width)
    else:
        _check_resolution(resolution, mode)
        if mode == "reference":
            resized_hw = (resolution, resolution)
        else:
            scale = resolution / max(height, width)
            # The longer side is set exactly; the shorter one is rounded and never collapses to 0.
            resized_hw = (
                resolution if height >= width else max(1, _round_half_up(height * scale)),
                resolution if width >= height else max(1, _round_half_up(width * scale)),
            )
    padded_hw = (_pad_up(resized_hw[0]), _pad_up(resized_hw[1]))
    return Geometry(input_hw=(height, width), resized_hw=resized_hw, padded_hw=padded_hw, mode=mode)


def _check_resolution(resolution: object, mode: ResizeMode) -> None:
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)):
        raise InputError(f"resolution is {resolution!r}; expected an integer number of pixels or 'native'")
    if not MIN_RESOLUTION <= resolution <= MAX_MODEL_SIDE_PX:
        raise InputError(
            f"resolution is {resolution}; expected {MIN_RESOLUTION}..{MAX_MODEL_SIDE_PX} px "
            f"({MAX_MODEL_SIDE_PX} is where the bf16 RoPE position ids stop being exact)"
        )
    if mode == "reference" and resolution % MULTIPLE_OF:
        raise InputError(
            f"resolution is {resolution}; reference mode squashes to a square whose side must be a multiple of "
            f"{MULTIPLE_OF} (e.g. {_pad_up(resolution)})"
        )


def _resize_float_plane(plane: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """PIL BILINEAR resize of one float32 [H,W] plane ('F' mode keeps full precision)."""
    if plane.shape == hw:
        return plane.copy()
    resized = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32)).resize((hw[1], hw[0]), Image.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def _check_frame_size(shape_hw: tuple[int, ...], geometry: Geometry, what: str) -> None:
    if tuple(shape_hw) != geometry.input_hw:
        raise InputError(f"{what} is {shape_hw[1]}x{shape_hw[0]}; the geometry was planned for "
                         f"{geometry.input_hw[1]}x{geometry.input_hw[0]} (width x height)")


def prepare_image(image: ImageLike, geometry: Geometry) -> torch.Tensor:
    """RGB frame [H,W,3] (uint8, or float in [0,1]) -> float32 ``pixels`` [3,Hp,Wp] in [-1,1], edge-padded."""
    array = _as_hwc(image)
    _check_frame_size(array.shape[:2], geometry, "image")
    height, width = geometry.resized_hw
    if array.dtype == np.uint8:
        # Resizing the uint8 image (not floats) is what makes this bit-exact with the reference.
        resized = np.asarray(Image.fromarray(np.ascontiguousarray(array)).resize((width, height), Image.BILINEAR))
    else:
        unit = _checked_unit_floats(array, "image")
        resized = np.stack([_resize_float_plane(unit[:, :, c], (height, width)) for c in range(3)], axis=2)
    pixels = to_model_pixels(resized)  # [3,h,w]
    pad_h, pad_w = geometry.padded_hw[0] - height, geometry.padded_hw[1] - width
    # Edge replication keeps the padding close to the content so the VAE sees no artificial border;
    # restore() crops it away again.
    return F.pad(pixels[None], (0, pad_w, 0, pad_h), mode="replicate")[0]


def resize_map(map_hw: ImageLike, geometry: Geometry) -> torch.Tensor:
    """Soft map [H,W] in [0,1] (mask, alpha) at the input size -> float32 [h,w] at ``geometry.resized_hw``."""
    array = _to_numpy(map_hw)
    if array.ndim != 2:
        raise InputError(f"map has shape {tuple(array.shape)}; expected one [H,W] map with values in [0, 1]")
    _check_frame_size(array.shape, geometry, "map")
    unit = _checked_unit_floats(array, "map")
    return torch.from_numpy(np.clip(_resize_float_plane(unit, geometry.resized_hw), 0.0, 1.0))


def pad_map(map_hw: ImageLike, geometry: Geometry) -> torch.Tensor:
    """Soft map [h,w] at ``geometry.resized_hw`` -> float32 [Hp,Wp], zero padded (padding = no foreground/point)."""
    tensor = torch.from_numpy(np.array(_to_numpy(map_hw), dtype=np.float32))
    if tuple(tensor.shape) != geometry.resized_hw:
        raise InputError(f"map has shape {tuple(tensor.shape)}; expected {geometry.resized_hw} (the resized size)")
    pad_h, pad_w = geometry.padded_hw[0] - geometry.resized_hw[0], geometry.padded_hw[1] - geometry.resized_hw[1]
    return F.pad(tensor, (0, pad_w, 0, pad_h), value=0.0)


def prepare_map(map_hw: ImageLike, geometry: Geometry) -> torch.Tensor:
    """Soft map [H,W] in [0,1] at the input size -> float32 [Hp,Wp]: bilinear resize, then zero padding."""
    return pad_map(resize_map(map_hw, geometry), geometry)


def restore(output: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """Model output [B,C,Hp,Wp] -> float32 [B,C,H,W] at the input size: crop the padding, resize back bilinearly.

    Values are interpolated as they are; callers renormalise unit normals afterwards.
    """
    if output.ndim != 4 or tuple(output.shape[2:]) != geometry.padded_hw:
        raise InputError(f"output has shape {tuple(output.shape)}; expected [B,C,{geometry.padded_hw[0]},"
                         f"{geometry.padded_hw[1]}] (the padded size)")
    height, width = geometry.resized_hw
    content = output[:, :, :height, :width].to(torch.float32)
    if geometry.resized_hw == geometry.input_hw:
        return content.contiguous()
    downscaling = geometry.input_hw[0] < height or geometry.input_hw[1] < width
    return F.interpolate(content, size=geometry.input_hw, mode="bilinear", align_corners=False, antialias=downscaling)
