"""Fuzzing FE2E's prompt cache (``--prompt-cache no_info.npz``): any bytes, damaged copies of the fixture's file, and
valid ``.npz`` archives holding arrays of any shape, dtype and values under its names -- through the reader, the
FE2E pipeline on the tiny model (for caches the reader accepts) and the CLI. Each file is used, or ends in the
project's error with a message; the CLI then exits with status 2 and writes nothing. Budget and seed: the hypothesis
profile in tests/conftest.py."""

import io

import numpy as np
import pytest
import torch
from fe2e_support import DIT, DIT_CONFIG, IMAGE, PROMPT_CACHE, VAE_CONFIG, fe2e_models
from fuzz_support import arrays, budget, damaged, parses_or_user_error, run_cli_expecting_error
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes
from hypothesis.extra.numpy import arrays as numpy_arrays

from e2p_core.cli import main
from e2p_core.connector import load_prompt_cache
from e2p_core.fe2e import perceive_fe2e
from e2p_core.images import load_image_rgb

VALID = PROMPT_CACHE.read_bytes()
WIDTH = int(np.load(PROMPT_CACHE)["embeds"].shape[-1])  # the tiny connector's input width


@st.composite
def npz_archives(draw) -> bytes:
    """An .npz of arrays of any small shape, dtype and values under the cache's names (and others), sometimes with
    the right width so that the pipeline's own checks are reached."""
    shapes = array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4) | st.tuples(
        st.sampled_from([(), (1,)]), st.integers(0, 5), st.sampled_from([WIDTH, WIDTH - 1, 0])
    ).map(lambda parts: (*parts[0], parts[1], parts[2]))
    names = draw(st.lists(st.sampled_from(["embeds", "masks", "extra"]), min_size=1, max_size=3, unique=True))
    contents = {name: draw(arrays(shapes)) for name in names}
    if "masks" in contents and draw(st.booleans()):  # a 0/1 mask with one entry per row of the embeddings
        embeds = contents.get("embeds")
        rows = embeds.shape[-2] if embeds is not None and embeds.ndim >= 2 else draw(st.integers(0, 4))
        dtype = np.dtype(draw(st.sampled_from([np.int64, np.uint8, np.bool_])))
        contents["masks"] = draw(numpy_arrays(dtype, (rows,),
                                              elements=st.booleans() if dtype == bool else st.integers(0, 1)))
    buffer = io.BytesIO()
    (np.savez_compressed if draw(st.booleans()) else np.savez)(buffer, **contents)
    return buffer.getvalue()


@st.composite
def plausible_caches(draw) -> bytes:
    """Caches the reader should accept (finite float embeddings, 0/1 masks with a 1) of any length, values and
    width: the connector and the DiT must take them or refuse them with a message."""
    rows, width = draw(st.integers(1, 6)), draw(st.sampled_from([WIDTH, WIDTH, 1, WIDTH + 16]))
    dtype = draw(st.sampled_from([np.float16, np.float32, np.float64]))
    embeds = draw(numpy_arrays(dtype, (rows, width), elements=st.floats(-1e4, 1e4, width=16)))
    masks = draw(numpy_arrays(np.int64, (rows,), elements=st.integers(0, 1)))
    masks[draw(st.integers(0, rows - 1))] = 1
    buffer = io.BytesIO()
    np.savez(buffer, embeds=embeds[None] if draw(st.booleans()) else embeds, masks=masks)
    return buffer.getvalue()


CACHE_FILES = npz_archives() | plausible_caches() | damaged(VALID) | st.binary(max_size=64)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz_prompt_cache")


@budget(12)  # an accepted cache runs the tiny FE2E once
@given(CACHE_FILES)
def test_prompt_cache_files_are_used_or_refused(folder, blob):
    path = folder / "no_info.npz"
    path.write_bytes(blob)
    cache = parses_or_user_error(load_prompt_cache, path)
    if cache is not None:
        denoiser, codec = fe2e_models(torch.float32, False)
        result = parses_or_user_error(perceive_fe2e, denoiser, codec, load_image_rgb(IMAGE), cache,
                                      resolution=(48, 64))
        if result is not None:
            assert torch.isfinite(result.depth).all()


@budget(15)
@given(CACHE_FILES)
def test_cli_prompt_cache_ends_in_an_error_and_writes_nothing(folder, blob):
    path = folder / "cli_no_info.npz"
    path.write_bytes(blob)
    out = folder / "cli_out"
    argv = ["predict", "--model", "fe2e", "--dit", str(DIT), "--dit-config", str(DIT_CONFIG),
            "--vae", str(folder / "missing_vae.safetensors"), "--vae-config", str(VAE_CONFIG),
            "--prompt-cache", str(path), "--image", str(IMAGE), "--out", str(out / "depth.png"),
            "--resolution", "64x48", "--dtype", "fp32", "--device", "cpu"]
    run_cli_expecting_error(main, argv, out)
