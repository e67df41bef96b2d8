"""``python -m e2p_core convert``: every naming direction, LoRA merging into an export, and LoRA re-exports.

Checks compare with the official fixture files (the BFL and DiffSynth copies of the same weights) and with what
the engine computes from the unconverted weights."""

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, TINY_DIT_CONFIG
from e2p_core.checkpoints import load_lora_file, read_metadata
from e2p_core.cli import main
from e2p_core.weights import load_dit

DIT_BFL, DIT_DIFFSYNTH = FIXTURES / "dit_bfl.safetensors", FIXTURES / "dit_diffsynth.safetensors"
LORA = FIXTURES / "lora_kohya.safetensors"


def convert(tmp_path, *args) -> dict[str, torch.Tensor]:
    out = tmp_path / "converted.safetensors"
    assert main(["convert", *args, "--output", str(out)]) == 0
    return load_file(out)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("source, target, expected", [
    (DIT_DIFFSYNTH, "bfl", DIT_BFL),
    (DIT_BFL, "diffsynth", DIT_DIFFSYNTH),
])
def test_dit_naming_conversions_reproduce_the_official_files(tmp_path, source, target, expected):
    """No config needed: converting does not depend on the RoPE axes split."""
    assert_same_tensors(convert(tmp_path, "--input", str(source), "--to", target), load_file(expected))


def test_diffusers_export_round_trips_to_bfl(tmp_path):
    diffusers_sd = convert(tmp_path, "--input", str(DIT_DIFFSYNTH), "--to", "diffusers")
    assert "transformer_blocks.0.attn.to_q.weight" in diffusers_sd
    back = tmp_path / "back"
    back.mkdir()
    from safetensors.torch import save_file

    save_file(diffusers_sd, back / "in.safetensors")
    assert main(["convert", "--input", str(back / "in.safetensors"), "--to", "bfl", "--output",
                 str(back / "bfl.safetensors")]) == 0
    assert_same_tensors(load_file(back / "bfl.safetensors"), load_file(DIT_BFL))


def test_merged_export_equals_the_engine_with_the_lora(tmp_path):
    """Base + LoRA exported as one BFL file (ComfyUI UNETLoader naming) holds what the engine merges on load."""
    merged = convert(tmp_path, "--input", str(DIT_DIFFSYNTH), "--lora", str(LORA), "--to", "bfl")
    engine = load_dit(DIT_BFL, TINY_DIT_CONFIG, [(LORA, 1.0)]).state_dict_bfl
    assert_same_tensors(merged, engine)
    base = load_file(DIT_BFL)
    qkv = "double_blocks.0.img_attn.qkv.weight"
    lora = load_file(LORA)
    up, down = (lora[f"lora_unet_double_blocks_0_img_attn_qkv.lora_{side}.weight"] for side in ("up", "down"))
    torch.testing.assert_close(merged[qkv], base[qkv] + up @ down, atol=1e-6, rtol=0)  # alpha = rank: scale 1


def test_half_strength_lora_and_dtype_cast(tmp_path):
    merged = convert(tmp_path, "--input", str(DIT_BFL), "--lora", f"{LORA}:0.5", "--to", "bfl", "--dtype", "bf16")
    engine = load_dit(DIT_BFL, TINY_DIT_CONFIG, [(LORA, 0.5)]).state_dict_bfl
    assert all(t.dtype == torch.bfloat16 for t in merged.values())
    assert_same_tensors(merged, {k: v.to(torch.bfloat16) for k, v in engine.items()})


@pytest.mark.parametrize("target", ["diffusers", "diffsynth", "kohya"])
def test_lora_re_exports_keep_every_update(tmp_path, target):
    out = tmp_path / f"lora_{target}.safetensors"
    assert main(["convert", "--kind", "lora", "--input", str(LORA), "--to", target, "--output", str(out)]) == 0
    original, converted = load_lora_file(LORA), load_lora_file(out)
    assert sorted(original) == sorted(converted) and len(original) == 26
    for module in original:
        torch.testing.assert_close(converted[module].delta(), original[module].delta(), atol=1e-6, rtol=0)
    if target == "diffusers":
        assert "lora_adapter_metadata" in read_metadata(out)


def test_vae_round_trip(tmp_path):
    diffusers_vae = convert(tmp_path, "--kind", "vae", "--input", str(FIXTURES / "vae_bfl.safetensors"), "--to",
                            "diffusers")
    assert "decoder.up_blocks.0.resnets.0.conv1.weight" in diffusers_vae
    folder = tmp_path / "vae"
    folder.mkdir()
    from safetensors.torch import save_file

    save_file(diffusers_vae, folder / "in.safetensors")
    assert main(["convert", "--kind", "vae", "--input", str(folder / "in.safetensors"), "--to", "bfl", "--output",
                 str(folder / "bfl.safetensors")]) == 0
    assert_same_tensors(load_file(folder / "bfl.safetensors"), load_file(FIXTURES / "vae_bfl.safetensors"))


def test_lora_cannot_become_a_dit_naming(tmp_path, capsys):
    assert main(["convert", "--kind", "lora", "--input", str(LORA), "--to", "bfl", "--output",
                 str(tmp_path / "x.safetensors")]) == 2
    assert "kohya, diffsynth or diffusers" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
