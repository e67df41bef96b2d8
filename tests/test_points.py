"""Tests for e2p_core.points: reference parity (app.py disks, gen_points, mask*2-1), parsing and the map modes."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from e2p_core.errors import InputError
from e2p_core.points import (
    _unit_gaussian_blob,
    build_point_map,
    click_region,
    default_disk_radius_px,
    default_sigma_px,
    encode_point_map,
    gaussians_at_clicks,
    parse_points,
    sample_point_map,
    scale_coords,
    to_pixel_coords,
    warn_negative_points,
)

FIXTURES = Path(__file__).parent / "fixtures" / "e2p_tiny"
# The fixture's sizes: app.py's 100 px disks and 30 px sigma at 768, scaled to the 64x48 image (manifest.json).
DISK_RADIUS_PX = 8
SIGMA_PX = 3


@pytest.fixture(scope="module")
def npz() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "inputs.npz") as data:
        return {key: data[key] for key in data.files}


# --- reference parity -------------------------------------------------------------------------------------------


def test_click_region_equals_app_py_disks(npz):
    alpha = click_region(npz["clicks_xy"], 48, 64, DISK_RADIUS_PX)
    assert alpha.dtype == np.float32
    assert np.array_equal(alpha, npz["click_disk_alpha"])


def test_sample_point_map_equals_gen_points(npz):
    point_map, coords_norm = sample_point_map(npz["click_disk_alpha"], num_points=10, sigma_px=SIGMA_PX)
    assert point_map.dtype == np.float32 and coords_norm.dtype == np.float32
    assert np.array_equal(point_map, npz["point_mask"])
    assert np.array_equal(coords_norm, npz["point_coords_norm"])


def test_encode_point_map_equals_reference_tensor(npz):
    encoded = encode_point_map(npz["point_mask"])
    assert encoded.dtype == torch.float32
    assert torch.equal(encoded, torch.from_numpy(npz["point_mask_tensor"]))


def test_json_clicks_to_encoded_map_reproduce_the_matting_run_input(npz):
    text = json.dumps([{"x": int(x), "y": int(y)} for x, y in npz["clicks_xy"]])
    clicks_px = scale_coords(to_pixel_coords(parse_points(text), 64, 48), (48, 64), (48, 64))
    point_map = build_point_map("app", 48, 64, points_px=clicks_px, sigma_px=SIGMA_PX, radius_px=DISK_RADIUS_PX)
    assert torch.equal(encode_point_map(point_map), torch.from_numpy(npz["point_mask_tensor"]))


def test_sampling_leaves_global_numpy_random_state_alone(npz):
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    sample_point_map(npz["click_disk_alpha"], sigma_px=SIGMA_PX)
    assert np.array_equal(np.random.get_state()[1], before)


def test_other_seed_gives_other_points(npz):
    _, coords_42 = sample_point_map(npz["click_disk_alpha"], sigma_px=SIGMA_PX)
    _, coords_7 = sample_point_map(npz["click_disk_alpha"], sigma_px=SIGMA_PX, seed=7)
    assert not np.array_equal(coords_42, coords_7)


@pytest.mark.parametrize(("height", "width", "sigma_px"), [(48, 64, 3), (30, 50, 7.5), (20, 20, 9), (100, 37, 2.2)])
def test_windowed_blob_is_bit_exact_with_whole_image_filter(height, width, sigma_px):
    rng = np.random.default_rng(0)
    # Corners and edges exercise the reflecting borders; random points the interior.
    spots = [(0, 0), (height - 1, width - 1), (0, width // 2), (height // 2, width - 1)]
    spots += [(int(rng.integers(height)), int(rng.integers(width))) for _ in range(20)]
    for row, col in spots:
        impulse = np.zeros((height, width), dtype=np.float32)
        impulse[row, col] = 1.0
        whole = gaussian_filter(impulse, sigma=sigma_px)
        assert np.array_equal(_unit_gaussian_blob(height, width, row, col, sigma_px), whole / whole.max())


def test_too_small_region_gives_an_empty_map_and_warns(caplog):
    region = np.zeros((32, 32), dtype=np.float32)
    region[5, 5:14] = 1.0  # 9 pixels, 10 needed
    with caplog.at_level(logging.WARNING):
        point_map, coords_norm = sample_point_map(region, sigma_px=2)
    assert not point_map.any() and not coords_norm.any() and coords_norm.shape == (20,)
    assert "point map is empty" in caplog.text


def test_threshold_is_strictly_above_point_eight():
    region = np.full((32, 32), 0.8, dtype=np.float32)
    assert not sample_point_map(region, sigma_px=2)[0].any()
    region[:4, :4] = 0.81
    point_map, coords_norm = sample_point_map(region, sigma_px=2)
    assert point_map.max() == 1.0
    assert (coords_norm < 4 / 32).all()


# --- defaults ---------------------------------------------------------------------------------------------------


def test_defaults_scale_the_reference_sizes_at_768():
    assert default_sigma_px(768) == 30 and default_disk_radius_px(768) == 100
    assert default_sigma_px(64) == 2.5 and default_disk_radius_px(1536) == 200


def test_build_point_map_uses_defaults_from_the_longer_side():
    clicks = [(100.0, 60.0)]
    expected = sample_point_map(click_region(clicks, 192, 384, 50), sigma_px=15)[0]
    assert np.array_equal(build_point_map("app", 192, 384, points_px=clicks), expected)


# --- parsing ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[{"x": 512, "y": 384}, {"x": 10.5, "y": 0}]', [(512.0, 384.0), (10.5, 0.0)]),
        ("[{'x': 512, 'y': 384}]", [(512.0, 384.0)]),
        ("[[1, 2], [3.5, 4]]", [(1.0, 2.0), (3.5, 4.0)]),
        ("", []),
        ("   \n", []),
        ("[]", []),
    ],
)
def test_parse_points_variants(text, expected):
    assert parse_points(text) == expected


@pytest.mark.parametrize(
    ("text", "expected_text"),
    [
        ('[{"x": 512, "y": 384}', "not valid JSON"),
        ('{"x": 1, "y": 2}', "not a list"),
        ('[{"x": 512}]', r'point \{"x": 512\} lacks'),
        ('[{"x": "left", "y": 3}]', r'point \{"x": "left", "y": 3\} has a non-numeric'),
        ('[{"x": NaN, "y": 3}]', "non-finite"),
        ("[[Infinity, 3]]", "non-finite"),
        ("[[true, 3]]", "non-numeric"),
        ("[[1, 2, 3]]", r"point \[1, 2, 3\] is neither"),
        ("[5]", r"point 5 is neither"),
    ],
)
def test_parse_points_errors_quote_the_offending_entry(text, expected_text):
    with pytest.raises(InputError, match=expected_text):
        parse_points(text)


def test_parse_points_rejects_non_strings():
    with pytest.raises(InputError, match="JSON string"):
        parse_points([{"x": 1, "y": 2}])  # type: ignore[arg-type]


def test_negative_points_are_counted_and_warned_about(caplog):
    with caplog.at_level(logging.WARNING):
        assert warn_negative_points('[{"x": 1, "y": 2}, {"x": 3, "y": 4}]') == 2
    assert "trained on positive points only" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert warn_negative_points("") == 0
    assert caplog.text == ""


# --- coordinate spaces ------------------------------------------------------------------------------------------


def test_normalized_and_pixel_spaces():
    assert np.array_equal(to_pixel_coords([(0.5, 0.25)], 640, 480, "normalized"), [[320.0, 120.0]])
    assert np.array_equal(to_pixel_coords([(0.5, 0.25)], 640, 480, "pixels"), [[0.5, 0.25]])


def test_auto_space_is_normalized_only_if_every_coordinate_is_in_0_1():
    assert np.array_equal(to_pixel_coords([(0.5, 0.25), (1, 0)], 640, 480), [[320.0, 120.0], [640.0, 0.0]])
    assert np.array_equal(to_pixel_coords([(0.5, 0.25), (2, 0)], 640, 480), [[0.5, 0.25], [2.0, 0.0]])
    assert to_pixel_coords([], 640, 480).shape == (0, 2)


def test_points_within_half_a_pixel_of_the_border_are_accepted():
    assert to_pixel_coords([(-0.5, 480.5)], 640, 480, "pixels").shape == (1, 2)


@pytest.mark.parametrize(
    ("points", "space"), [([(641, 10)], "pixels"), ([(10, -1)], "pixels"), ([(0.5, 1.01)], "normalized")]
)
def test_points_outside_the_image_name_the_point_and_size(points, space):
    with pytest.raises(InputError, match=rf"point \({points[0][0]:g}, {points[0][1]:g}\).*640x480 image"):
        to_pixel_coords(points, 640, 480, space)


@pytest.mark.parametrize(
    ("points", "space", "expected_text"),
    [([(1, 2)], "percent", "unknown coordinate space"), ([(np.nan, 2)], "pixels", "NaN"), ([(1, 2, 3)], "auto", "N,2")],
)
def test_bad_points_or_space_are_input_errors(points, space, expected_text):
    with pytest.raises(InputError, match=expected_text):
        to_pixel_coords(points, 640, 480, space)


def test_scale_coords_matches_app_py_integer_scaling():
    scaled = scale_coords([(20, 14), (125, 999)], (1000, 1000), (768, 768))
    assert np.array_equal(scaled, [[15.36, 10.752], [96.0, 767.232]])
    # app.py computes int(x * 768 / W); 125 * 0.768 would land on 95.999... and truncate to 95.
    assert np.trunc(scaled[1, 0]) == int(125 * 768 / 1000) == 96
    assert np.array_equal(scale_coords([(64, 0)], (48, 64), (96, 32)), [[32.0, 0.0]])


def test_click_region_truncates_clicks_like_app_py():
    assert np.array_equal(click_region([(10.9, 5.7)], 20, 20, 3), click_region([(10, 5)], 20, 20, 3))


# --- modes ------------------------------------------------------------------------------------------------------


def test_clicks_mode_peaks_exactly_at_the_clicks():
    clicks = np.array([(5.0, 7.0), (30.0, 20.0), (47.0, 0.0)])
    point_map = build_point_map("clicks", 32, 48, points_px=clicks, sigma_px=3)
    assert point_map.dtype == np.float32 and point_map.shape == (32, 48)
    peaks_yx = np.argwhere(point_map == point_map.max())
    assert sorted(map(tuple, peaks_yx)) == sorted((int(y), int(x)) for x, y in clicks)
    assert point_map.max() == 1.0
    assert point_map[16, 15] < 1e-3  # far from every click


def test_clicks_mode_is_a_gaussian_of_sigma():
    point_map = gaussians_at_clicks([(10.0, 10.0)], 21, 21, sigma_px=2.0)
    assert point_map[10, 12] == pytest.approx(np.exp(-4 / 8), rel=1e-6)
    assert point_map[12, 12] == pytest.approx(np.exp(-8 / 8), rel=1e-6)


def test_mask_mode_samples_like_training(npz):
    point_map = build_point_map("mask", 48, 64, mask=torch.from_numpy(npz["click_disk_alpha"]), sigma_px=SIGMA_PX)
    assert np.array_equal(point_map, npz["point_mask"])


@pytest.mark.parametrize("mode", ["app", "clicks"])
@pytest.mark.parametrize("points_px", [None, [], np.zeros((0, 2))])
def test_no_clicks_give_an_empty_map_and_a_warning(mode, points_px, caplog):
    with caplog.at_level(logging.WARNING):
        point_map = build_point_map(mode, 32, 48, points_px=points_px)
    assert point_map.shape == (32, 48) and not point_map.any()
    assert "no points given" in caplog.text


@pytest.mark.parametrize(
    ("kwargs", "expected_text"),
    [
        ({"mode": "mask"}, "needs a mask"),
        ({"mode": "mask", "mask": np.ones((48, 32))}, "mask is 32x48; expected 48x32"),
        ({"mode": "mask", "mask": np.ones((1, 32, 48))}, r"\[H,W\]"),
        ({"mode": "mask", "mask": np.full((32, 48), np.nan)}, "NaN"),
        ({"mode": "lasso", "points_px": [(1, 2)]}, "unknown point map mode"),
        ({"mode": "clicks", "points_px": [(1, 2)], "sigma_px": 0}, "positive"),
        ({"mode": "app", "points_px": [(1, 2)], "sigma_px": -1.0}, "sigma_px > 0"),
    ],
)
def test_build_point_map_errors(kwargs, expected_text):
    with pytest.raises(InputError, match=expected_text):
        build_point_map(height=32, width=48, **kwargs)


@pytest.mark.parametrize(
    ("point_map", "expected_text"),
    [(np.full((8, 8), 1.5), r"\[0, 1\]"), (np.full((8, 8), -0.2), r"\[0, 1\]"), (np.full((8, 8), np.nan), "NaN"),
     (np.zeros((3, 8, 8)), r"\[H,W\]")],
)
def test_encode_point_map_rejects_bad_maps(point_map, expected_text):
    with pytest.raises(InputError, match=expected_text):
        encode_point_map(point_map)


def test_encode_point_map_of_an_empty_map_is_minus_one_everywhere():
    encoded = encode_point_map(torch.zeros(16, 24))
    assert tuple(encoded.shape) == (3, 16, 24) and (encoded == -1).all()
