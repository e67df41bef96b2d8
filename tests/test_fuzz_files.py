"""Fuzzing the file parsers: safetensors headers (random, truncated, oversized, lying, wrong dtypes), weights with
the right container but wrong tensors, and prompt-embedding files -- through the checkpoint and prompt loaders of
e2p_core up to the models built from them, the ComfyUI nodes and the CLI. Each file parses, or ends in the project's
error with a message; the CLI then exits with status 2 and writes nothing. Budget and seed: the hypothesis profile
in tests/conftest.py."""

import functools
import io
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from comfy_support import load_pack
from fuzz_support import arrays, budget, damaged, parses_or_user_error, run_cli_expecting_error, safetensors_bytes
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes
from safetensors.torch import load_file, save_file

from conftest import FIXTURES, TINY_DIT_CONFIG
from e2p_core.backends.diffusers_backend import load_diffusers_backend
from e2p_core.checkpoints import load_lora_file, load_state_dict, read_metadata
from e2p_core.cli import main
from e2p_core.prompts import load_prompt_embeddings
from e2p_core.weights import load_dit, load_vae, recorded_time_embedding

load_pack()
from e2p_pack.nodes.loader import load_e2p_model  # noqa: E402

FIXTURE_WEIGHTS = {kind: load_file(FIXTURES / f"{name}.safetensors")
                   for kind, name in (("dit", "dit_bfl"), ("vae", "vae_bfl"), ("lora", "lora_kohya"))}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A folder for the fuzzed files, with the fixture DiT as ``base`` and the tiny RoPE axes beside every DiT name
    (the node loader's ``<name>.json``), so that a file which parses is also built into a model."""
    folder = tmp_path_factory.mktemp("fuzz_files")
    shutil.copy(FIXTURES / "dit_bfl.safetensors", folder / "base.safetensors")
    for name in ("base", "weights", "dit", "vae", "lora"):
        (folder / f"{name}.json").write_text(json.dumps(TINY_DIT_CONFIG))
    return folder


@pytest.fixture(scope="module")
def fixture_models():
    return load_dit(FIXTURES / "dit_bfl.safetensors", TINY_DIT_CONFIG), load_vae(FIXTURES / "vae_bfl.safetensors")


def loaders(path, folder, fixture_models):
    """Every loader a weights or embeddings file given by a user reaches, up to the models built from it."""
    dit, vae = fixture_models
    return [
        lambda: load_state_dict(path),
        lambda: read_metadata(path),
        lambda: recorded_time_embedding([(path, 1.0)]),
        lambda: load_diffusers_backend(load_dit(path, TINY_DIT_CONFIG), vae, torch.float32),
        lambda: load_diffusers_backend(load_dit(folder / "base.safetensors", TINY_DIT_CONFIG, loras=[(path, 1.0)]),
                                       vae, torch.float32),
        lambda: load_diffusers_backend(dit, load_vae(path), torch.float32),
        lambda: load_lora_file(path),
        lambda: load_prompt_embeddings(path),
        lambda: load_e2p_model(path),
        lambda: load_e2p_model(folder / "base.safetensors", lora_path=path),
    ]


@given(safetensors_bytes())
def test_safetensors_headers_through_every_loader(folder, fixture_models, blob):
    path = folder / "weights.safetensors"
    path.write_bytes(blob)
    for load in loaders(path, folder, fixture_models):
        parses_or_user_error(load)


@st.composite
def wrong_tensors(draw, keys):
    """Some of ``keys`` with tensors of any small shape (empty ones included), dtype and values."""
    small = array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=3)
    tensors = {}
    for key in draw(st.lists(st.sampled_from(keys), max_size=6, unique=True)):
        values = draw(arrays(small))
        tensors[key] = torch.from_numpy(values.astype(np.int32) if values.dtype == np.uint16 else values)
    return tensors


@budget(40)
@given(data=st.data(), which=st.sampled_from(["dit", "vae", "lora"]))
def test_weights_with_wrong_tensors(folder, fixture_models, data, which):
    """The fixture's DiT, VAE or LoRA in a valid container with keys missing and others of the wrong shape/dtype."""
    tensors = dict(FIXTURE_WEIGHTS[which])
    keys = sorted(tensors)
    for key in data.draw(st.lists(st.sampled_from(keys), max_size=3, unique=True)):
        del tensors[key]
    tensors.update(data.draw(wrong_tensors(keys)))
    path = folder / f"{which}.safetensors"
    save_file({key: value.contiguous() for key, value in tensors.items()}, path)
    for load in loaders(path, folder, fixture_models):
        parses_or_user_error(load)


@given(prompt_embeds=arrays(), pooled=arrays(), metadata=st.dictionaries(
    st.sampled_from(["format", "prompt", "e2p.time_embedding"]) | st.text(max_size=3),
    st.sampled_from(["e2p-prompt-embeds-v1", "", "bf16", "exact", "v2"]) | st.text(max_size=6), max_size=3),
    drop=st.sampled_from([None, "prompt_embeds", "pooled_prompt_embeds"]))
def test_prompt_embedding_files(folder, prompt_embeds, pooled, metadata, drop):
    tensors = {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}
    tensors = {key: torch.from_numpy(v.astype(np.int32) if v.dtype == np.uint16 else v).contiguous()
               for key, v in tensors.items() if key != drop}
    path = folder / "prompt.safetensors"
    save_file(tensors, path, metadata=metadata)
    loaded = parses_or_user_error(load_prompt_embeddings, path)
    if loaded is not None:
        assert loaded.prompt_embeds.ndim == 3 and loaded.pooled_prompt_embeds.ndim == 2
        assert torch.isfinite(loaded.prompt_embeds).all() and torch.isfinite(loaded.pooled_prompt_embeds).all()
    parses_or_user_error(recorded_time_embedding, [(path, 1.0)])


@budget(15)
@given(blob=safetensors_bytes(), flag=st.sampled_from(["--dit", "--vae", "--lora", "--prompt-embeds", "--noise"]))
def test_cli_weight_files_end_in_an_error_and_write_nothing(folder, prompt_files, dit_config_file, blob, flag):
    """Each file flag of `predict` given a broken file (the other inputs are fine)."""
    path = folder / "cli_input.safetensors"
    path.write_bytes(blob)
    out = folder / "cli_out"
    args = {"--dit": str(FIXTURES / "dit_bfl.safetensors"), "--dit-config": str(dit_config_file),
            "--vae": str(FIXTURES / "vae_bfl.safetensors"), "--prompt-embeds": str(prompt_files["depth"]),
            flag: str(path)}
    argv = ["predict", "--task", "depth", "--image", str(FIXTURES / "input.png"), "--device", "cpu",
            "--dtype", "fp32", "--out", str(out / "depth.png"), "--raw", str(out / "raw.safetensors"),
            *[item for pair in args.items() for item in pair]]
    run_cli_expecting_error(main, argv, out)


@budget(15)
@given(blob=safetensors_bytes(), kind=st.sampled_from(["dit", "vae", "lora"]), to=st.sampled_from(["bfl", "kohya"]))
def test_cli_convert_ends_in_an_error_and_writes_nothing(folder, blob, kind, to):
    path = folder / "convert_input.safetensors"
    path.write_bytes(blob)
    out = folder / "convert_out"
    run_cli_expecting_error(main, ["convert", "--kind", kind, "--input", str(path), "--to", to,
                                   "--output", str(out / "converted.safetensors")], out)


@functools.cache
def gguf_bytes() -> bytes:
    """The fixture DiT as a city96-style Q8_0 GGUF (a function, not a fixture: hypothesis would print its bytes)."""
    from test_memory_modes import write_gguf

    with tempfile.TemporaryDirectory() as folder:
        write_gguf(Path(folder) / "valid.gguf", FIXTURE_WEIGHTS["dit"])
        return (Path(folder) / "valid.gguf").read_bytes()


@budget(30)
@given(data=st.data())
def test_damaged_gguf_files(folder, data):
    """A city96-style GGUF DiT, truncated or with bytes overwritten (header, tensor infos or data)."""
    from e2p_core.backends.gguf import load_gguf_dit

    path = folder / "damaged.gguf"
    valid = gguf_bytes()
    path.write_bytes(data.draw(damaged(valid) | damaged(valid[:512]) | st.binary(max_size=64)))
    parses_or_user_error(load_gguf_dit, path, TINY_DIT_CONFIG)


@functools.cache
def png_bytes(mode: str) -> bytes:
    """A small valid PNG of ``mode`` (RGB for --image, 16-bit grey for a --point-mask)."""
    from PIL import Image

    buffer = io.BytesIO()
    values = np.arange(48 * 64, dtype=np.uint16).reshape(48, 64)
    picture = Image.fromarray(values if mode == "I;16" else np.stack([values % 256] * 3, axis=-1).astype(np.uint8))
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


@budget(30)
@given(data=st.data(), flag=st.sampled_from(["--image", "--point-mask", "--point-map"]))
def test_cli_damaged_pictures_end_in_an_error_and_write_nothing(folder, prompt_files, data, flag):
    """A damaged PNG as the image or as a matting mask / point map (a missing --dit ends a run that reads it)."""
    valid = png_bytes("RGB" if flag == "--image" else "I;16")
    path = folder / "picture.png"
    path.write_bytes(data.draw(damaged(valid) | damaged(valid[:200]) | st.binary(max_size=64)))
    out = folder / "picture_out"
    args = {"--image": str(FIXTURES / "input.png"), flag: str(path)}
    argv = ["predict", "--task", "matting", "--dit", str(folder / "missing.safetensors"),
            "--vae", str(FIXTURES / "vae_bfl.safetensors"), "--prompt-embeds", str(prompt_files["matting"]),
            "--device", "cpu", "--out", str(out / "alpha.png"), *[item for pair in args.items() for item in pair]]
    run_cli_expecting_error(main, argv, out)
