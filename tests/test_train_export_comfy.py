"""A LoRA exported by ``python -m train`` loads in the ComfyUI node (real ComfyUI modules, in-process) to the same
weights the engine merges, and the node picks up the timestep-embedding variant the export records."""

import json
import shutil

import pytest
import torch
from comfy_support import load_pack, use_model_folders

from conftest import FIXTURES, TINY_DIT_CONFIG
from e2p_core.weights import load_dit
from test_nodes_loader import native_weights
from train.trainer import train
from train_support.runs import one_thread, tiny_config, write_tiny_setup  # noqa: F401 (fixture)

load_pack()
from e2p_pack.nodes.loader import TIME_EMBEDDING_ATTACHMENT, E2PModelLoader  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_trained_lora_loads_in_the_node_as_the_engine_merges_it(tmp_path):
    setup = write_tiny_setup(tmp_path / "setup", "depth", samples=2)
    result = train(tiny_config(setup, "depth", tmp_path / "run", max_steps=2, learning_rate=1e-2,
                               time_embedding="exact"))
    folders = use_model_folders(tmp_path / "models")
    shutil.copy(FIXTURES / "dit_bfl.safetensors", folders["diffusion_models"])
    (folders["diffusion_models"] / "dit_bfl.json").write_text(json.dumps(TINY_DIT_CONFIG))
    shutil.copy(result.export_path, folders["loras"] / "trained.safetensors")

    (model,) = E2PModelLoader().load("dit_bfl.safetensors", "default", "trained.safetensors", 1.0)
    assert model.get_attachment(TIME_EMBEDDING_ATTACHMENT) == "exact"
    native = native_weights(model)
    engine = load_dit(FIXTURES / "dit_bfl.safetensors", TINY_DIT_CONFIG, loras=[(result.export_path, 1.0)])
    base = load_dit(FIXTURES / "dit_bfl.safetensors", TINY_DIT_CONFIG).state_dict_bfl
    changed = [key for key in base if not torch.equal(engine.state_dict_bfl[key], base[key])]
    assert len(changed) == 26  # every LoRA module of the tiny DiT was trained
    assert native.keys() == engine.state_dict_bfl.keys()
    for key, merged in engine.state_dict_bfl.items():
        torch.testing.assert_close(native[key], merged, atol=1e-6, rtol=1e-5, msg=key)
