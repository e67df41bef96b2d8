"""Interop with third-party packs and core nodes, as found in a run with the real packs (issue 13, item 4).

* KJNodes' Points Editor writes ``'""'`` (a JSON-quoted empty string) for an empty point list: it means no points,
  in the node and in the CLI alike.
* Core ``LoraLoaderModelOnly`` reads a LoRA's tensors but not its safetensors metadata, so the timestep-embedding
  variant ``python -m train`` records is lost on that path. ``auto`` therefore means ``bf16`` when nothing is recorded
  (how every known Edit2Perceive weight was trained), and both loaders give the same prediction.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from comfy_support import core_nodes, load_pack, tiny_flux_vae, use_model_folders
from safetensors.torch import load_file, save_file

from conftest import FIXTURES, TINY_DIT_CONFIG
from e2p_core.points import parse_points
from e2p_core.time_embedding import resolve_time_embedding
from e2p_core.weights import TIME_EMBEDDING_METADATA_KEY
from test_cli_errors import run_cli

load_pack()
from e2p_pack.nodes.conditioning import E2PTaskConditioning  # noqa: E402
from e2p_pack.nodes.loader import TIME_EMBEDDING_ATTACHMENT, E2PModelLoader  # noqa: E402
from e2p_pack.nodes.perceive import run_perceive  # noqa: E402
from e2p_pack.nodes.point_prompt import E2PPointPrompt  # noqa: E402

KJNODES_EMPTY = '""'  # json.dumps("") -- what the Points Editor sends for an empty list
CLICK = '[{"x": 20, "y": 16}]'
RESOLUTION = 64


# ------------------------------------------------------------------------------------------- KJNodes empty lists


@pytest.mark.parametrize("text", ["", "  ", "[]", KJNODES_EMPTY, "''", '"[]"', '" "'])
def test_empty_point_texts_mean_no_points(text):
    assert parse_points(text) == []


def test_kjnodes_empty_string_through_the_point_prompt_node():
    image = torch.rand(1, 40, 56, 3, generator=torch.Generator().manual_seed(0))
    assert E2PPointPrompt.VALIDATE_INPUTS(positive_coords=CLICK, negative_coords=KJNODES_EMPTY) is True
    assert E2PPointPrompt.VALIDATE_INPUTS(positive_coords=KJNODES_EMPTY, negative_coords=KJNODES_EMPTY) is True
    with_empty_negatives, preview = E2PPointPrompt().build(image, CLICK, "pixels", "app", KJNODES_EMPTY)
    plain, plain_preview = E2PPointPrompt().build(image, CLICK, "pixels", "app", "")
    assert np.array_equal(with_empty_negatives.prompt.points_px, plain.prompt.points_px)
    assert torch.equal(preview, plain_preview) and preview.max() == 1
    no_points, empty_preview = E2PPointPrompt().build(image, KJNODES_EMPTY, "auto", "app", KJNODES_EMPTY)
    assert len(no_points.prompt.points_px) == 0 and empty_preview.shape == (1, 40, 56) and empty_preview.max() == 0


def test_kjnodes_empty_string_through_the_cli(tmp_path, prompt_files, dit_config_file):
    matting = {"__task": "matting", "__prompt_embeds": str(prompt_files["matting"])}
    outputs = {}
    for name, points, negatives in (("plain", "[[20, 16]]", None), ("kjnodes", "[[20, 16]]", KJNODES_EMPTY),
                                    ("none", KJNODES_EMPTY, KJNODES_EMPTY)):
        status, written = run_cli(tmp_path / name, prompt_files, dit_config_file, **matting, __points=points,
                                  __negative_points=negatives, __points_space="pixels")
        assert status == 0 and written == ["map.png", "raw.safetensors"], name
        outputs[name] = load_file(tmp_path / name / "out" / "raw.safetensors")
    assert torch.equal(outputs["kjnodes"]["point_map"], outputs["plain"]["point_map"])
    assert torch.equal(outputs["kjnodes"]["output"], outputs["plain"]["output"])
    assert outputs["plain"]["point_map"].max() == 1 and outputs["none"]["point_map"].max() == 0


# ------------------------------------------------------------------------- time embedding through core LoRA nodes


def test_auto_resolves_to_the_record_else_bf16():
    assert resolve_time_embedding("auto", None) == resolve_time_embedding(None, None) == "bf16"
    assert resolve_time_embedding("auto", "exact") == "exact"
    assert resolve_time_embedding("reference", "bf16") == "reference"


def test_cli_auto_without_a_record_runs_bf16(tmp_path, prompt_files, dit_config_file):
    """The fixture DiT records nothing: the default equals --time-embedding bf16, not the float32 'reference'."""
    velocities = {}
    for variant in ("auto", "bf16", "reference"):
        status, _ = run_cli(tmp_path / variant, prompt_files, dit_config_file, __time_embedding=variant)
        assert status == 0
        velocities[variant] = load_file(tmp_path / variant / "out" / "raw.safetensors")["velocity"]
    assert torch.equal(velocities["auto"], velocities["bf16"])
    assert (velocities["auto"] - velocities["reference"]).abs().max() > 1e-2


@pytest.fixture
def folders(tmp_path, prompt_files):
    folders = use_model_folders(tmp_path)
    shutil.copy(FIXTURES / "dit_bfl.safetensors", folders["diffusion_models"])
    (folders["diffusion_models"] / "dit_bfl.json").write_text(json.dumps(TINY_DIT_CONFIG))
    for task, path in prompt_files.items():
        shutil.copy(path, folders["e2p_prompts"] / f"{task}.safetensors")
    return folders


def test_lora_with_a_recorded_variant_through_core_lora_loader_matches_the_pack_loader(folders):
    """The fixture LoRA with the record ``python -m train`` writes by default (``bf16``): loaded by the pack's loader
    (which reads the record) and by core LoraLoaderModelOnly (which cannot), 'auto' predicts the same."""
    save_file(load_file(FIXTURES / "lora_kohya.safetensors"), folders["loras"] / "trained.safetensors",
              metadata={TIME_EMBEDDING_METADATA_KEY: "bf16"})
    (pack_model,) = E2PModelLoader().load("dit_bfl.safetensors", "default", "trained.safetensors", 1.0)
    (base,) = E2PModelLoader().load("dit_bfl.safetensors", "default", "none", 1.0)
    (core_model,) = core_nodes().LoraLoaderModelOnly().load_lora_model_only(base, "trained.safetensors", 1.0)
    assert pack_model.get_attachment(TIME_EMBEDDING_ATTACHMENT) == "bf16"
    assert core_model.get_attachment(TIME_EMBEDDING_ATTACHMENT) is None  # the record is lost on the core path
    assert len(core_model.patches) == len(pack_model.patches) == 26

    vae = tiny_flux_vae(load_file(FIXTURES / "vae_bfl.safetensors"))
    (conditioning,) = E2PTaskConditioning().encode("depth", "auto")
    image = torch.rand(1, 40, 56, 3, generator=torch.Generator().manual_seed(1))
    by_pack = run_perceive(pack_model, vae, conditioning, image, resolution=RESOLUTION).output
    by_core = run_perceive(core_model, vae, conditioning, image, resolution=RESOLUTION).output
    torch.testing.assert_close(by_core, by_pack, atol=1e-5, rtol=0)
    # The old fallback (compute-dtype rounding: exact frequencies in float32) moves the prediction far beyond that.
    compute_dtype = run_perceive(core_model, vae, conditioning, image, resolution=RESOLUTION,
                                 time_embedding="reference").output
    assert (compute_dtype - by_pack).abs().max() > 1e-2
