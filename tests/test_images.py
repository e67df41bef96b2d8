"""Tests for e2p_core.images: reference parity on the e2p-tiny fixtures, geometry plans, loading and errors."""

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from e2p_core.errors import InputError
from e2p_core.images import (
    Geometry,
    load_image_rgb,
    pad_map,
    plan_geometry,
    prepare_image,
    prepare_map,
    resize_map,
    restore,
    to_model_pixels,
)

FIXTURES = Path(__file__).parent / "fixtures" / "e2p_tiny"
ODD_SIZES = [(37, 53), (17, 301), (1000, 333), (333, 1000), (16, 16), (768, 768)]


@pytest.fixture(scope="module")
def npz() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "inputs.npz") as data:
        return {key: data[key] for key in data.files}


def image_like_ramp(height: int, width: int) -> np.ndarray:
    """Smooth float32 [H,W,3] in [0,1]: two linear ramps and a slow sine."""
    rows, cols = np.mgrid[:height, :width]
    sine = 0.5 + 0.4 * np.sin(2 * np.pi * (cols / width + rows / height))
    return np.stack([cols / (width - 1), rows / (height - 1), sine], axis=2).astype(np.float32)


# --- reference parity -------------------------------------------------------------------------------------------


def test_load_fixture_png_gives_the_reference_uint8(npz):
    assert np.array_equal(load_image_rgb(FIXTURES / "input.png"), npz["image_uint8"])


def test_to_model_pixels_is_bit_exact_with_reference_to_tensor(npz):
    assert torch.equal(to_model_pixels(npz["image_uint8"]), torch.from_numpy(npz["rgb_tensor"]))


def test_native_plan_of_fixture_is_a_no_op_like_the_reference(npz):
    geometry = plan_geometry((48, 64), "aligned", "native")
    assert geometry.padded_hw == (48, 64)
    assert torch.equal(prepare_image(npz["image_uint8"], geometry), torch.from_numpy(npz["rgb_tensor"]))


def test_reference_squash_to_64_is_bit_exact(npz):
    geometry = plan_geometry((48, 64), "reference", 64)
    assert geometry.resized_hw == geometry.padded_hw == (64, 64)
    assert torch.equal(prepare_image(npz["image_uint8"], geometry), torch.from_numpy(npz["rgb_square64_tensor"]))


def test_reference_squash_to_32_is_bit_exact_antialiased_downscale(npz):
    # 32 is below the minimum resolution, so the plan is built by hand; this pins the antialiased PIL downscale.
    geometry = Geometry(input_hw=(48, 64), resized_hw=(32, 32), padded_hw=(32, 32), mode="reference")
    assert torch.equal(prepare_image(npz["image_uint8"], geometry), torch.from_numpy(npz["rgb_square32_tensor"]))


# --- geometry plans ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("input_hw", ODD_SIZES)
@pytest.mark.parametrize("resolution", [64, 768, 1000])
def test_aligned_plan_keeps_aspect_and_pads_to_16(input_hw, resolution):
    geometry = plan_geometry(input_hw, "aligned", resolution)
    assert max(geometry.resized_hw) == resolution
    scale = resolution / max(input_hw)
    # Each side is the exactly scaled side rounded to the nearest pixel: the aspect is kept within 1 px.
    assert all(abs(resized - side * scale) <= 0.5 for resized, side in zip(geometry.resized_hw, input_hw))
    assert all(side % 16 == 0 for side in geometry.padded_hw)
    assert all(0 <= padded - resized < 16 for padded, resized in zip(geometry.padded_hw, geometry.resized_hw))
    assert geometry.input_hw == input_hw and geometry.mode == "aligned"


@pytest.mark.parametrize("input_hw", ODD_SIZES)
def test_reference_plan_is_square(input_hw):
    geometry = plan_geometry(input_hw, "reference", 512)
    assert geometry.resized_hw == geometry.padded_hw == (512, 512)


@pytest.mark.parametrize("mode", ["aligned", "reference"])
def test_native_plan_keeps_input_size_and_only_pads(mode):
    geometry = plan_geometry((37, 53), mode, "native")
    assert geometry.resized_hw == (37, 53)
    assert geometry.padded_hw == (48, 64)


def test_aligned_plan_is_the_default_at_768():
    assert plan_geometry((480, 640)) == Geometry((480, 640), (576, 768), (576, 768), "aligned")


@pytest.mark.parametrize(
    ("mode", "resolution", "expected_text"),
    [
        ("reference", 100, "multiple of 16"),
        ("aligned", 32, "64..4096"),
        ("aligned", 5000, "RoPE"),
        ("reference", 8192, "RoPE"),
        ("aligned", "768", "integer"),
        ("aligned", True, "integer"),
        ("squash", 768, "'aligned' or 'reference'"),
    ],
)
def test_bad_resolution_or_mode_is_an_input_error(mode, resolution, expected_text):
    with pytest.raises(InputError, match=expected_text):
        plan_geometry((480, 640), mode, resolution)


def test_aligned_accepts_a_resolution_that_is_not_a_multiple_of_16():
    assert plan_geometry((480, 640), "aligned", 100).padded_hw == (80, 112)


def test_native_above_4096_suggests_a_resolution():
    with pytest.raises(InputError, match="choose a resolution"):
        plan_geometry((100, 5000), "aligned", "native")


def test_plan_rejects_tiny_inputs():
    with pytest.raises(InputError, match="at least 16x16"):
        plan_geometry((8, 8), "aligned", 768)


# --- prepare -> restore -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("input_hw", "mode", "resolution"),
    [((37, 53), "aligned", 768), ((17, 301), "aligned", 768), ((1000, 333), "aligned", 768),
     ((48, 64), "reference", 64), ((333, 1000), "reference", 256)],
)
@pytest.mark.parametrize("as_uint8", [False, True])
def test_prepare_then_restore_returns_input_size_and_values(input_hw, mode, resolution, as_uint8):
    ramp = image_like_ramp(*input_hw)
    image = np.round(ramp * 255).astype(np.uint8) if as_uint8 else ramp
    geometry = plan_geometry(input_hw, mode, resolution)
    pixels = prepare_image(image, geometry)
    assert pixels.dtype == torch.float32 and tuple(pixels.shape) == (3, *geometry.padded_hw)
    assert pixels.min() >= -1 and pixels.max() <= 1
    restored = restore(pixels[None], geometry)
    assert tuple(restored.shape) == (1, 3, *input_hw)
    error = (restored[0] - to_model_pixels(image)).abs()
    assert error.mean() < 0.01 and error.max() < 0.1


def test_native_restore_is_an_exact_crop():
    image = np.round(image_like_ramp(37, 53) * 255).astype(np.uint8)
    geometry = plan_geometry((37, 53), "aligned", "native")
    assert torch.equal(restore(prepare_image(image, geometry)[None], geometry)[0], to_model_pixels(image))


def test_padding_replicates_the_last_row_and_column():
    geometry = plan_geometry((37, 53), "aligned", "native")
    pixels = prepare_image(image_like_ramp(37, 53), geometry)
    assert torch.equal(pixels[:, 37:, :53], pixels[:, 36:37, :53].expand(3, 11, 53))
    assert torch.equal(pixels[:, :, 53:], pixels[:, :, 52:53].expand(3, 48, 11))


@pytest.mark.parametrize(("input_hw", "resolution"), [((37, 53), 768), ((333, 1000), 256), ((48, 64), 64)])
def test_float_and_uint8_inputs_agree_within_one_level(input_hw, resolution):
    rng = np.random.default_rng(0)
    image_uint8 = rng.integers(0, 256, size=(*input_hw, 3), dtype=np.uint8)
    geometry = plan_geometry(input_hw, "reference", resolution)
    from_uint8 = prepare_image(image_uint8, geometry)
    from_float = prepare_image(torch.from_numpy(image_uint8.astype(np.float32) / 255), geometry)
    assert ((from_uint8 - from_float).abs().max() / 2) <= 1 / 255 + 1e-6


def test_restore_downscale_is_antialiased_and_float32():
    geometry = plan_geometry((48, 64), "reference", 256)
    # Every 4th column lit: a 4x downscale sees its 25% coverage only when antialiased; plain bilinear samples
    # between two dark columns and returns 0.
    stripes = (torch.arange(256) % 4 == 0).to(torch.bfloat16)
    restored = restore(stripes[None, None, None, :].expand(1, 3, 256, 256), geometry)
    assert restored.dtype == torch.float32 and tuple(restored.shape) == (1, 3, 48, 64)
    assert restored.mean().item() == pytest.approx(0.25, abs=0.01) and restored.min() > 0.15


def test_restore_rejects_a_wrong_size():
    geometry = plan_geometry((48, 64), "reference", 64)
    with pytest.raises(InputError, match="padded size"):
        restore(torch.zeros(1, 3, 48, 64), geometry)


# --- maps -------------------------------------------------------------------------------------------------------


def test_prepare_map_resizes_bilinearly_and_zero_pads():
    geometry = plan_geometry((37, 53), "aligned", 100)  # resized (70, 100), padded (80, 112)
    prepared = prepare_map(np.full((37, 53), 0.75, dtype=np.float32), geometry)
    assert prepared.dtype == torch.float32 and tuple(prepared.shape) == (80, 112)
    assert torch.allclose(prepared[:70, :100], torch.tensor(0.75), atol=1e-6)
    assert prepared[70:].abs().sum() == 0 and prepared[:, 100:].abs().sum() == 0


def test_resize_map_keeps_a_soft_edge_in_range():
    geometry = plan_geometry((37, 53), "aligned", 768)
    step = np.zeros((37, 53), dtype=np.float32)
    step[:, 26:] = 1.0
    resized = resize_map(torch.from_numpy(step), geometry)
    assert tuple(resized.shape) == geometry.resized_hw
    assert resized.min() == 0 and resized.max() == 1
    assert ((resized > 0) & (resized < 1)).any()  # bilinear, not nearest


def test_pad_map_expects_the_resized_size():
    geometry = plan_geometry((37, 53), "aligned", 100)
    assert tuple(pad_map(np.ones((70, 100)), geometry).shape) == (80, 112)
    with pytest.raises(InputError, match="resized size"):
        pad_map(np.ones((37, 53)), geometry)


@pytest.mark.parametrize("bad_map", [np.ones((37, 52)), np.ones((37, 53, 1)), np.full((37, 53), np.nan)])
def test_prepare_map_rejects_bad_maps(bad_map):
    with pytest.raises(InputError, match="map"):
        prepare_map(bad_map, plan_geometry((37, 53), "aligned", 64))


# --- to_model_pixels input checks -------------------------------------------------------------------------------


def test_float_frame_from_comfyui_is_accepted_and_slight_overshoot_clamped():
    frame = torch.rand(20, 24, 3, dtype=torch.float16)
    frame[0, 0, 0] = 1.0005
    pixels = to_model_pixels(frame)
    assert pixels.dtype == torch.float32 and tuple(pixels.shape) == (3, 20, 24)
    assert pixels.max() == 1.0


def test_rgba_frame_drops_alpha_with_a_warning(caplog):
    frame = np.random.default_rng(0).random((20, 24, 4)).astype(np.float32)
    with caplog.at_level(logging.WARNING):
        pixels = to_model_pixels(frame)
    assert torch.equal(pixels, to_model_pixels(frame[:, :, :3]))
    assert "alpha" in caplog.text


@pytest.mark.parametrize(
    ("frame", "expected_text"),
    [
        (np.full((20, 24, 3), np.nan, dtype=np.float32), "NaN"),
        (np.full((20, 24, 3), np.inf, dtype=np.float32), "NaN or infinite"),
        (np.full((20, 24, 3), 1.01, dtype=np.float32), r"expected floats in \[0, 1\]"),
        (np.full((20, 24, 3), -0.5, dtype=np.float32), r"expected floats in \[0, 1\]"),
        (np.zeros((1, 20, 24, 3), dtype=np.float32), r"\[H,W,3\]"),
        (np.zeros((20, 24), dtype=np.uint8), r"\[H,W,3\]"),
        (np.zeros((20, 24, 3), dtype=np.int32), "uint8"),
    ],
)
def test_bad_frames_are_input_errors(frame, expected_text):
    with pytest.raises(InputError, match=expected_text):
        to_model_pixels(frame)


def test_prepare_image_rejects_a_frame_of_another_size():
    with pytest.raises(InputError, match="planned for 64x48"):
        prepare_image(np.zeros((40, 64, 3), dtype=np.uint8), plan_geometry((48, 64), "reference", 64))


# --- loading files ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rgba_pixels() -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, size=(20, 24, 4), dtype=np.uint8)


def test_rgba_file_loads_like_reference_convert_rgb_and_warns(tmp_path, rgba_pixels, caplog):
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba_pixels, mode="RGBA").save(path)
    with caplog.at_level(logging.WARNING):
        loaded = load_image_rgb(path)
    assert np.array_equal(loaded, np.asarray(Image.open(path).convert("RGB")))
    assert "alpha channel was ignored" in caplog.text


@pytest.mark.parametrize(("mode", "has_alpha"), [("L", False), ("LA", True), ("P", False)])
def test_gray_and_palette_files_load_like_reference_convert_rgb(tmp_path, rgba_pixels, caplog, mode, has_alpha):
    path = tmp_path / f"{mode}.png"
    source = Image.fromarray(rgba_pixels, mode="RGBA") if has_alpha else Image.fromarray(rgba_pixels[:, :, :3])
    source.convert(mode).save(path)
    with caplog.at_level(logging.WARNING):
        loaded = load_image_rgb(path)
    assert loaded.dtype == np.uint8 and loaded.shape == (20, 24, 3)
    assert np.array_equal(loaded, np.asarray(Image.open(path).convert("RGB")))
    assert ("alpha channel was ignored" in caplog.text) == has_alpha


def test_16_bit_gray_is_scaled_not_clipped(tmp_path):
    gray16 = (np.arange(20 * 24).reshape(20, 24) * 137).astype(np.uint16)
    path = tmp_path / "gray16.png"
    Image.fromarray(gray16).save(path)
    loaded = load_image_rgb(path)
    assert np.array_equal(loaded[:, :, 0], np.round(gray16 / 257).astype(np.uint8))
    assert np.array_equal(loaded[:, :, 0], loaded[:, :, 2])


def test_exif_orientation_is_applied_unless_disabled(tmp_path):
    path = tmp_path / "rotated.png"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.new("RGB", (40, 20), (10, 20, 30)).save(path, exif=exif)
    assert load_image_rgb(path).shape == (40, 20, 3)
    assert load_image_rgb(path, apply_exif_orientation=False).shape == (20, 40, 3)


def test_1x1_image_is_rejected_with_a_clear_message(tmp_path):
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1)).save(path)
    with pytest.raises(InputError, match=r"dot\.png.*image is 1x1; at least 16x16 needed"):
        load_image_rgb(path)


def test_too_large_side_is_rejected(tmp_path):
    path = tmp_path / "strip.png"
    Image.new("L", (16385, 16)).save(path)
    with pytest.raises(InputError, match="at most 16384"):
        load_image_rgb(path)


def test_decompression_bomb_is_an_input_error(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(InputError, match="too large to decode safely"):
        load_image_rgb(FIXTURES / "input.png")


def test_non_image_file_is_an_input_error_naming_it(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not a PNG")
    with pytest.raises(InputError, match=r"cannot read '.*notes\.png' as an image"):
        load_image_rgb(path)


def test_missing_file_is_an_input_error_naming_it(tmp_path):
    with pytest.raises(InputError, match=r"missing\.jpg.*does not exist"):
        load_image_rgb(tmp_path / "missing.jpg")


def test_geometry_is_frozen():
    geometry = plan_geometry((48, 64))
    with pytest.raises(dataclasses.FrozenInstanceError):
        geometry.mode = "reference"  # type: ignore[misc]
