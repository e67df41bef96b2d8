"""The model loader node: BFL and DiffSynth DiTs, every LoRA naming, fp8, errors -- all into a native ComfyUI MODEL.

Expected weights are computed here from the files themselves: BFL tensors as stored, and a LoRA merged by hand as
W + strength * (alpha / rank) * up @ down, with kohya module names derived from the BFL keys (``.`` -> ``_``).
"""

import json
import shutil

import pytest
import torch
from comfy_support import load_pack, use_model_folders
from safetensors.torch import load_file, save_file

from conftest import FIXTURES, TINY_DIT_CONFIG
from e2p_core.checkpoints import load_lora_file, lora_to_diffsynth_peft, lora_to_diffusers_peft

pack = load_pack()
import comfy.model_management  # noqa: E402
import comfy.sd  # noqa: E402
from e2p_pack.e2p_core.errors import CheckpointError  # noqa: E402
from e2p_pack.nodes.loader import TIME_EMBEDDING_ATTACHMENT, E2PModelLoader, load_e2p_model  # noqa: E402

STRENGTH = 0.5


@pytest.fixture
def folders(tmp_path):
    folders = use_model_folders(tmp_path)
    for name in ("dit_bfl", "dit_diffsynth"):
        shutil.copy(FIXTURES / f"{name}.safetensors", folders["diffusion_models"])
        (folders["diffusion_models"] / f"{name}.json").write_text(json.dumps(TINY_DIT_CONFIG))
    return folders


def native_weights(model) -> dict[str, torch.Tensor]:
    """The DiT weights ComfyUI computes with: LoRA patches applied by its memory manager."""
    comfy.model_management.load_models_gpu([model])
    weights = {key: value.clone() for key, value in model.model.diffusion_model.state_dict().items()}
    model.unpatch_model()  # base weights are shared between clones
    return weights


def hand_merged(strength: float) -> dict[str, torch.Tensor]:
    bfl = load_file(FIXTURES / "dit_bfl.safetensors")
    lora = load_file(FIXTURES / "lora_kohya.safetensors")
    merged = dict(bfl)
    for key in bfl:
        kohya = "lora_unet_" + key.removesuffix(".weight").replace(".", "_")
        if f"{kohya}.lora_down.weight" in lora:
            down, up = lora[f"{kohya}.lora_down.weight"], lora[f"{kohya}.lora_up.weight"]
            scale = float(lora[f"{kohya}.alpha"]) / down.shape[0]
            merged[key] = bfl[key] + strength * scale * (up @ down)
    assert len(merged) == len(bfl) and sum(not torch.equal(merged[k], bfl[k]) for k in bfl) == 26
    return merged


def test_bfl_and_diffsynth_files_load_to_the_same_native_model(folders):
    bfl = load_file(FIXTURES / "dit_bfl.safetensors")
    for name in ("dit_bfl", "dit_diffsynth"):
        (model,) = E2PModelLoader().load(f"{name}.safetensors", "default", "none", 1.0)
        assert type(model).__name__ == "ModelPatcher" and type(model.model).__name__ == "Flux"
        weights = native_weights(model)
        assert weights.keys() == bfl.keys()
        for key, tensor in bfl.items():
            assert torch.equal(weights[key], tensor), key


def lora_files(folder) -> dict[str, str]:
    """The fixture LoRA in the four key styles the engine reads."""
    pairs = load_lora_file(FIXTURES / "lora_kohya.safetensors")
    shutil.copy(FIXTURES / "lora_kohya.safetensors", folder / "kohya.safetensors")
    bfl_peft = {}
    for module, pair in pairs.items():  # ComfyUI's own style: diffusion_model.<BFL module>.lora_A/B
        bfl_peft[f"diffusion_model.{module}.lora_A.weight"] = pair.down
        bfl_peft[f"diffusion_model.{module}.lora_B.weight"] = pair.up * pair.scale
    save_file(bfl_peft, folder / "bfl_peft.safetensors")
    save_file(lora_to_diffsynth_peft(pairs), folder / "diffsynth_peft.safetensors")
    diffusers_sd, metadata = lora_to_diffusers_peft(pairs)
    save_file(diffusers_sd, folder / "diffusers_peft.safetensors", metadata=metadata)
    return {style: f"{style}.safetensors" for style in ("kohya", "bfl_peft", "diffsynth_peft", "diffusers_peft")}


def test_every_lora_naming_becomes_the_same_patches(folders):
    expected = hand_merged(STRENGTH)
    for style, lora_name in lora_files(folders["loras"]).items():
        (model,) = E2PModelLoader().load("dit_diffsynth.safetensors", "default", lora_name, STRENGTH)
        assert len(model.patches) == 26, style
        weights = native_weights(model)
        for key, tensor in expected.items():
            torch.testing.assert_close(weights[key], tensor, atol=1e-6, rtol=0, msg=f"{style}: {key}")


def test_core_lora_loading_stacks_on_the_model(folders):
    """What core 'LoraLoaderModelOnly' does (comfy.sd.load_lora_for_models) works on our MODEL: the released kohya
    LoRA needs no conversion for ComfyUI."""
    (model,) = E2PModelLoader().load("dit_bfl.safetensors", "default", "none", 1.0)
    patched, _ = comfy.sd.load_lora_for_models(model, None, load_file(FIXTURES / "lora_kohya.safetensors"), STRENGTH, 0)
    weights = native_weights(patched)
    for key, tensor in hand_merged(STRENGTH).items():
        torch.testing.assert_close(weights[key], tensor, atol=1e-6, rtol=0, msg=key)


def test_fp8_storage_and_recorded_time_embedding(tmp_path):
    bfl = load_file(FIXTURES / "dit_bfl.safetensors")
    save_file(bfl, tmp_path / "dit.safetensors", metadata={"e2p.time_embedding": "bf16"})
    (tmp_path / "dit.json").write_text(json.dumps(TINY_DIT_CONFIG))
    model = load_e2p_model(tmp_path / "dit.safetensors", "fp8_e4m3fn")
    assert model.model.diffusion_model.img_in.weight.dtype == torch.float8_e4m3fn
    assert model.model.manual_cast_dtype == torch.float32  # ComfyUI computes fp8 weights in float32 on CPU
    assert model.get_attachment(TIME_EMBEDDING_ATTACHMENT) == "bf16"
    save_file(bfl, tmp_path / "dit.safetensors")  # no record: the perceive node falls back to "reference"
    assert load_e2p_model(tmp_path / "dit.safetensors").get_attachment(TIME_EMBEDDING_ATTACHMENT) is None


def test_readable_errors(tmp_path, folders):
    with pytest.raises(CheckpointError, match=r"dit_bfl\.json.*axes_dims_rope"):
        load_e2p_model(shutil.copy(FIXTURES / "dit_bfl.safetensors", tmp_path))  # tiny head size, no sidecar
    with pytest.raises(CheckpointError, match="VAE"):
        load_e2p_model(FIXTURES / "vae_bfl.safetensors")
    with pytest.raises(CheckpointError, match="LoRA.*not a full model"):
        load_e2p_model(FIXTURES / "lora_kohya.safetensors")
    wrong = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 32),
             "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(192, 4)}
    save_file(wrong, folders["loras"] / "other_model.safetensors")
    with pytest.raises(CheckpointError, match=r"other_model\.safetensors is a LoRA for another base model.*"
                                              r"double_blocks\.0\.img_attn\.qkv expects \[192, 32\].*\[192, 64\]"):
        E2PModelLoader().load("dit_bfl.safetensors", "default", "other_model.safetensors", 1.0)
    with pytest.raises(CheckpointError, match="weight_dtype"):
        E2PModelLoader().load("dit_bfl.safetensors", "fp16", "none", 1.0)


def test_schema_lists_the_model_folders(folders, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))  # nothing of the sources table in the HF cache
    required = E2PModelLoader.INPUT_TYPES()["required"]
    models, loras = required["model_name"][0], required["lora_name"][0]
    assert models[:2] == ["dit_bfl.safetensors", "dit_diffsynth.safetensors"] and loras[0] == "none"
    # then the known files that are not on disk, as downloads (tests/test_nodes_hub.py)
    assert all(" (download " in name for name in models[2:] + loras[1:]) and len(loras) == 4
    assert required["weight_dtype"][0] == ["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"]
    assert all("tooltip" in options for _, options in required.values())
