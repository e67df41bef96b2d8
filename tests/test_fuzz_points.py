"""Fuzzing the point-prompt parsers: point JSON (any text) and point maps / masks (any shape, dtype, NaN/inf), through
e2p_core, the ComfyUI nodes and the CLI. Each input parses, or ends in the project's error with a message; the CLI
then exits with status 2 and writes nothing. Budget and seed: the hypothesis profile in tests/conftest.py."""

import math

import numpy as np
import pytest
import torch
from comfy_support import load_pack
from fuzz_support import POINT_TEXTS, arrays, budget, parses_or_user_error, run_cli_expecting_error
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes
from safetensors.torch import save_file

from conftest import FIXTURES, TINY_DIT_CONFIG
from e2p_core.cli import main
from e2p_core.pipeline import PointPrompt, perceive
from e2p_core.points import build_point_map, encode_point_map, parse_points, sample_point_map, to_pixel_coords

load_pack()
from e2p_pack.nodes.perceive import _check_point_map  # noqa: E402
from e2p_pack.nodes.point_picker import point_map_png  # noqa: E402
from e2p_pack.nodes.point_prompt import E2PPointPrompt, make_point_prompt  # noqa: E402

IMAGE_HW = (48, 64)  # the fixture image's size, which the CLI reads
# Maps whose last two sides sometimes match a 16x17 image, so that the checks past the shape test are reached too.
MAP_SHAPES = array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=3) | st.tuples(
    st.lists(st.integers(0, 2), max_size=2), st.sampled_from([16, 17]), st.sampled_from([16, 17])
).map(lambda parts: (*parts[0], parts[1], parts[2]))


# ------------------------------------------------------------------------------------------------------ point JSON


@given(POINT_TEXTS)
def test_point_json_parses_or_is_refused(text):
    points = parses_or_user_error(parse_points, text)
    if points is None:
        return
    assert all(isinstance(v, float) and math.isfinite(v) for point in points for v in point) and \
        all(len(point) == 2 for point in points)
    for space in ("auto", "pixels", "normalized"):
        pixels = parses_or_user_error(to_pixel_coords, points, IMAGE_HW[1], IMAGE_HW[0], space)
        if pixels is not None:
            assert pixels.shape == (len(points), 2) and np.isfinite(pixels).all()


@given(POINT_TEXTS, POINT_TEXTS)
def test_point_prompt_node_validates_or_refuses_any_text(positive, negative):
    image = torch.zeros(1, 20, 24, 3)
    verdict = E2PPointPrompt.VALIDATE_INPUTS(positive_coords=positive, negative_coords=negative)
    assert verdict is True or (isinstance(verdict, str) and verdict.strip())
    built = parses_or_user_error(make_point_prompt, image, positive, "auto", "app", negative)
    if verdict is not True:
        assert built is None  # what fails the check before the run fails the run too
    if built is not None:
        assert built[1].shape == (1, 20, 24) and torch.isfinite(built[1]).all()


@budget(30)
@given(POINT_TEXTS)
def test_cli_points_end_in_an_error_and_write_nothing(tmp_path_factory, prompt_files, text):
    """--points with any text (a missing --dit ends the run once the points are read)."""
    out = tmp_path_factory.mktemp("cli_points") / "out"
    argv = ["predict", "--task", "matting", "--dit", str(out.parent / "missing.safetensors"),
            "--vae", str(FIXTURES / "vae_bfl.safetensors"), "--image", str(FIXTURES / "input.png"),
            "--prompt-embeds", str(prompt_files["matting"]), "--device", "cpu", "--out", str(out / "alpha.png"),
            f"--points={text}", f"--negative-points={text}"]
    run_cli_expecting_error(main, argv, out)


NUMBERS = st.integers(-5, 48).map(str) | st.sampled_from(["", "abc", "1e3", " 12", "12.5", "0x10", "٣٢",
                                                              "99999999999999999999"])
PICKER_QUERIES = st.fixed_dictionaries({}, optional={
    "points": POINT_TEXTS, "coords_space": st.sampled_from(["auto", "pixels", "normalized"]) | st.text(max_size=4),
    "mode": st.sampled_from(["app", "clicks"]) | st.text(max_size=4), "width": NUMBERS, "height": NUMBERS,
    "resize_mode": st.sampled_from(["aligned", "reference"]) | st.text(max_size=4),
    "resolution": NUMBERS | st.sampled_from(["0", "64", "768"]),
})


@given(PICKER_QUERIES)
def test_point_picker_route_draws_or_refuses_any_query(query):
    """The picker's GET /e2p/point_map query (the browser sends the node's widgets): a PNG, or the project's error
    that the route answers with a 400 and its message."""
    png = parses_or_user_error(point_map_png, query)
    if png is not None:
        assert png.startswith(b"\x89PNG")


# -------------------------------------------------------------------------------------------------- maps and masks


@given(arrays(MAP_SHAPES))
def test_point_maps_and_masks_in_e2p_core(values):
    for array in (values, torch.from_numpy(values.astype(np.float32) if values.dtype == np.uint16 else values)):
        encoded = parses_or_user_error(encode_point_map, array)
        if encoded is not None:
            assert encoded.shape == (3, *values.shape) and torch.isfinite(encoded).all()
            assert encoded.min() >= -1 and encoded.max() <= 1
        sampled = parses_or_user_error(sample_point_map, array, num_points=2, sigma_px=1.5)
        if sampled is not None:
            assert sampled[0].shape == values.shape and np.isfinite(sampled[0]).all()
        if values.ndim == 2:
            built = parses_or_user_error(build_point_map, "mask", *values.shape, mask=array, num_points=2)
            if built is not None:
                assert built.shape == values.shape and np.isfinite(built).all()


@pytest.fixture(scope="module")
def tiny_backend():
    from e2p_core.backends.diffusers_backend import load_diffusers_backend
    from e2p_core.weights import load_dit, load_vae

    dit = load_dit(FIXTURES / "dit_bfl.safetensors", TINY_DIT_CONFIG)
    return load_diffusers_backend(dit, load_vae(FIXTURES / "vae_bfl.safetensors"), torch.float32, "cpu")


@budget(40)
@given(values=arrays(MAP_SHAPES), use_mask=st.booleans())
def test_point_maps_and_masks_through_the_pipeline(tiny_backend, matting_prompt, values, use_mask):
    """A map (or a mask for the training-style prompt) of any shape, dtype and values for a 16x17 image."""
    image = np.zeros((16, 17, 3), dtype=np.uint8)
    denoiser, codec = tiny_backend
    if use_mask:
        call = dict(points=PointPrompt(mask=values, mode="mask"))
    else:
        call = dict(point_map=values)
    result = parses_or_user_error(perceive, denoiser, codec, image, "matting", matting_prompt, resolution="native",
                                  **call)
    if result is not None:
        assert result.output.shape == (1, 1, 16, 17) and torch.isfinite(result.output).all()


@pytest.fixture(scope="module")
def matting_prompt(prompt_files):
    from e2p_core.prompts import load_prompt_embeddings

    return load_prompt_embeddings(prompt_files["matting"])


@given(arrays(MAP_SHAPES))
def test_point_prompt_node_masks_and_perceive_point_maps(values):
    """The nodes' MASK inputs: the point prompt's foreground mask and the perceive node's point map."""
    mask = torch.from_numpy(values.astype(np.float32) if values.dtype == np.uint16 else values)
    built = parses_or_user_error(make_point_prompt, torch.zeros(1, 16, 17, 3), "[]", "auto", "app", "", mask)
    if built is not None:
        assert built[1].shape == (1, 16, 17) and torch.isfinite(built[1]).all()
    checked = parses_or_user_error(_check_point_map, mask, 2)
    if checked is not None:
        assert checked.ndim == 3 and checked.shape[0] in (1, 2)


@budget(30)
@given(values=arrays(MAP_SHAPES), flag=st.sampled_from(["--point-map", "--point-mask"]))
def test_cli_point_map_files_end_in_an_error_and_write_nothing(tmp_path_factory, prompt_files, values, flag):
    """A safetensors point map / mask of any shape, dtype and values (a missing --dit ends a run that reads it)."""
    folder = tmp_path_factory.mktemp("cli_maps")
    key = flag.removeprefix("--").replace("-", "_")
    tensor = torch.from_numpy(values.astype(np.int32) if values.dtype == np.uint16 else values)
    save_file({key: tensor.contiguous()}, folder / "map.safetensors")
    argv = ["predict", "--task", "matting", "--dit", str(folder / "missing.safetensors"),
            "--vae", str(FIXTURES / "vae_bfl.safetensors"), "--image", str(FIXTURES / "input.png"),
            "--prompt-embeds", str(prompt_files["matting"]), "--device", "cpu",
            "--out", str(folder / "out" / "alpha.png"), flag, str(folder / "map.safetensors")]
    run_cli_expecting_error(main, argv, folder / "out")
