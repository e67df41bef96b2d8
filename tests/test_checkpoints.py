"""Tests for e2p_core.checkpoints: file I/O, sniffing, DiT/VAE key maps (bit-exact), architecture and LoRAs.

diffusers and peft serve as independent references here only; the package itself never imports them.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, FluxKontextPipeline, FluxTransformer2DModel
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.torch import save_file

import e2p_core.checkpoints as ckpt
from e2p_core.checkpoints import io as ckpt_io
from e2p_core.errors import CheckpointError

FIXTURES = Path(__file__).parent / "fixtures" / "e2p_tiny"
TINY_DIFFUSERS_CONFIG = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
                             num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32,
                             guidance_embeds=True, axes_dims_rope=(4, 6, 6))
TINY_VAE_CONFIG = dict(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                       block_out_channels=(32, 64, 64, 64), layers_per_block=2, latent_channels=16, norm_num_groups=32,
                       scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)


@pytest.fixture(scope="module")
def dit_bfl():
    return ckpt.load_state_dict(FIXTURES / "dit_bfl.safetensors")


@pytest.fixture(scope="module")
def dit_diffsynth():
    return ckpt.load_state_dict(FIXTURES / "dit_diffsynth.safetensors")


@pytest.fixture(scope="module")
def vae_bfl():
    return ckpt.load_state_dict(FIXTURES / "vae_bfl.safetensors")


@pytest.fixture(scope="module")
def lora_kohya_sd():
    return ckpt.load_state_dict(FIXTURES / "lora_kohya.safetensors")


def assert_same_tensors(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for key in expected:
        assert actual[key].dtype == expected[key].dtype, key
        assert torch.equal(actual[key], expected[key]), key


def randomized(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill every parameter with distinct random values, so swapped keys (e.g. q/k norms, all ones) are caught."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    return module


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------------------------------- file I/O


def test_missing_file_names_the_file_and_the_folder(tmp_path):
    with pytest.raises(CheckpointError) as err:
        ckpt.load_state_dict(tmp_path / "depth.safetensors")
    assert "depth.safetensors" in str(err.value) and str(tmp_path.resolve()) in str(err.value)


def test_pickle_renamed_to_safetensors_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    torch.save({"w": torch.ones(2)}, path)
    with pytest.raises(CheckpointError, match="PyTorch pickle/zip archive, not safetensors"):
        ckpt.load_state_dict(path)


def test_truncated_empty_and_garbage_files_are_refused(tmp_path):
    data = (FIXTURES / "lora_kohya.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "noise.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="truncated"):
        ckpt.load_state_dict(tmp_path / "cut.safetensors")
    with pytest.raises(CheckpointError, match="empty"):
        ckpt.load_state_dict(tmp_path / "empty.safetensors")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        ckpt.load_state_dict(tmp_path / "noise.safetensors")


def test_legacy_pt_loads_tensors_and_unwraps_state_dict(tmp_path):
    weights = {"a.weight": torch.arange(6.0).reshape(2, 3)}
    torch.save({"state_dict": weights, "epoch": 3}, tmp_path / "model.ckpt")
    assert_same_tensors(ckpt.load_state_dict(tmp_path / "model.ckpt"), weights)


class _TouchOnUnpickle:
    """Unpickling this would create a file: proof of whether pickle code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_legacy_pickle_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pickle_code_ran"
    torch.save({"w": torch.ones(1), "payload": _TouchOnUnpickle(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        ckpt.load_state_dict(tmp_path / "evil.pt")
    assert not marker.exists()


def test_save_atomic_round_trip_metadata_views_and_parent_dir(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    tensors = {"t": base.t(), "row": base[1:2], "same": base, "again": base}  # non-contiguous, views, repeats
    path = tmp_path / "new" / "out.safetensors"
    ckpt.save_safetensors_atomic(tensors, path, metadata={"note": "hi"})
    assert_same_tensors(ckpt.load_state_dict(path), {k: v.contiguous() for k, v in tensors.items()})
    assert ckpt.read_metadata(path) == {"note": "hi"}
    assert no_temp_files(path.parent)


def test_save_atomic_failure_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "out.safetensors"
    ckpt.save_safetensors_atomic({"w": torch.ones(2)}, path)
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match="not tensors"):
        ckpt.save_safetensors_atomic({"w": torch.zeros(2), "bad": 3}, path)  # type: ignore[dict-item]

    def crash_midway(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_io, "save_file", crash_midway)
    with pytest.raises(CheckpointError, match="disk full"):
        ckpt.save_safetensors_atomic({"w": torch.zeros(2)}, path)
    assert path.read_bytes() == before
    assert no_temp_files(tmp_path)


def _write_model_folder(folder: Path, sd: dict, config: dict, shards: int = 1) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    if shards == 1:
        save_file(sd, folder / "diffusion_pytorch_model.safetensors")
        return
    keys = sorted(sd)
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k] for k in keys[i::shards]}
        save_file(part, folder / name)
        weight_map.update({k: name for k in part})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_diffusers_folders_single_sharded_and_pipeline_root(tmp_path, dit_bfl, vae_bfl):
    transformer = ckpt.bfl_to_diffusers(dit_bfl)
    transformer = {k: v.clone() for k, v in transformer.items()}  # safetensors files need unshared tensors
    vae = ckpt.vae_to_diffusers(vae_bfl)
    _write_model_folder(tmp_path / "single", transformer, {"_class_name": "FluxTransformer2DModel"})
    _write_model_folder(tmp_path / "pipe" / "transformer", transformer, TINY_DIFFUSERS_CONFIG, shards=3)
    _write_model_folder(tmp_path / "pipe" / "vae", vae, TINY_VAE_CONFIG)

    sd, config = ckpt.load_diffusers_folder(tmp_path / "single")
    assert_same_tensors(sd, transformer)
    assert config == {"_class_name": "FluxTransformer2DModel"}
    sd, config = ckpt.load_diffusers_folder(tmp_path / "pipe")
    assert_same_tensors(sd, transformer)
    assert config["num_layers"] == 2
    sd, config = ckpt.load_diffusers_folder(tmp_path / "pipe", subfolder="vae")
    assert_same_tensors(sd, vae)
    assert_same_tensors(ckpt.load_state_dict(tmp_path / "pipe"), transformer)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        ckpt.load_diffusers_folder(tmp_path / "empty")


def test_dequantize_scaled_fp8(dit_bfl):
    weight = dit_bfl["img_in.weight"]
    scale = weight.abs().max() / 448.0
    per_row = weight.abs().amax(dim=1) / 448.0
    sd = {
        "img_in.weight": (weight / scale).to(torch.float8_e4m3fn),
        "img_in.scale_weight": scale,
        "img_in.input_scale": torch.tensor(1.0),
        "img_in.bias": dit_bfl["img_in.bias"],
        "txt_in.weight": (dit_bfl["txt_in.weight"] / per_row[:, None]).to(torch.float8_e5m2),
        "txt_in.weight_scale": per_row,
        "plain_fp8": dit_bfl["txt_in.bias"].to(torch.float8_e4m3fn),
        "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn),
    }
    out = ckpt.dequantize(sd, torch.float32)
    assert sorted(out) == ["img_in.bias", "img_in.weight", "plain_fp8", "txt_in.weight"]
    assert torch.equal(out["img_in.weight"], sd["img_in.weight"].float() * scale)
    assert torch.equal(out["txt_in.weight"], sd["txt_in.weight"].float() * per_row[:, None])
    assert torch.equal(out["img_in.bias"], dit_bfl["img_in.bias"])
    assert out["plain_fp8"].dtype == torch.float32
    torch.testing.assert_close(out["img_in.weight"], weight, rtol=0.07, atol=1e-3)  # fp8 keeps ~3 mantissa bits
    with pytest.raises(CheckpointError, match="dequantize"):
        ckpt.to_bfl({**dit_bfl, "img_in.scale_weight": scale})


# ----------------------------------------------------------------------------------------------------- sniffing


def test_strip_prefixes_only_when_every_key_has_it():
    sd = {"model.diffusion_model.img_in.weight": 1, "model.diffusion_model.txt_in.weight": 2}
    assert ckpt.strip_prefixes(sd) == {"img_in.weight": 1, "txt_in.weight": 2}
    assert ckpt.strip_prefixes({"pipe.dit.x_embedder.weight": 1}) == {"x_embedder.weight": 1}
    mixed = {"model.diffusion_model.img_in.weight": 1, "first_stage_model.encoder.conv_in.weight": 2}
    assert ckpt.strip_prefixes(mixed) == mixed


def test_sniff_dit_formats(dit_bfl, dit_diffsynth):
    assert ckpt.sniff_dit_format(dit_bfl) == "bfl"
    assert ckpt.sniff_dit_format(dit_diffsynth) == "diffsynth"
    assert ckpt.sniff_dit_format(ckpt.bfl_to_diffusers(dit_bfl)) == "diffusers"
    assert ckpt.sniff_dit_format({f"transformer.{k}": v for k, v in dit_diffsynth.items()}) == "diffsynth"


def test_sniff_mixed_dit_keys_names_examples_of_each(dit_bfl, dit_diffsynth):
    mixed = {**{k: v for k, v in dit_bfl.items() if k.startswith("double_blocks")},
             **{k: v for k, v in dit_diffsynth.items() if k.startswith("blocks.")}}
    with pytest.raises(CheckpointError, match="mixes") as err:
        ckpt.sniff_dit_format(mixed)
    assert "double_blocks.0." in str(err.value) and "blocks.0.attn." in str(err.value)


@pytest.mark.parametrize("keys, words", [
    (["encoder.down.0.block.0.conv1.weight", "decoder.mid.attn_1.q.weight"], "VAE"),
    (["encoder.down_blocks.0.resnets.0.conv1.weight", "decoder.up_blocks.0.resnets.0.conv1.weight"], "VAE"),
    (["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"], "LoRA"),
    (["model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.middle_block.0.in_layers.0.weight"],
     "UNet"),
    (["down_blocks.0.attentions.0.proj_in.weight", "time_embedding.linear_1.weight"], "UNet"),
    (["encoder.block.0.layer.0.SelfAttention.q.weight", "shared.weight"], "text encoder"),
    (["something.else.weight"], "unknown layout"),
])
def test_sniff_says_what_a_non_dit_looks_like(keys, words):
    with pytest.raises(CheckpointError, match=words):
        ckpt.to_bfl({key: torch.zeros(1) for key in keys})


def test_sniff_lora_formats(lora_kohya_sd):
    lora = ckpt.load_lora(lora_kohya_sd)
    assert ckpt.sniff_lora_format(lora_kohya_sd) == "kohya"
    assert ckpt.sniff_lora_format(ckpt.lora_to_diffsynth_peft(lora)) == "diffsynth_peft"
    assert ckpt.sniff_lora_format(ckpt.lora_to_diffusers_peft(lora)[0]) == "diffusers_peft"
    comfy = {"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(1),
             "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": torch.zeros(1)}
    assert ckpt.sniff_lora_format(comfy) == "bfl_peft"
    sdxl = {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(1),
            "down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="unknown LoRA key style"):
        ckpt.load_lora(sdxl)
    with pytest.raises(CheckpointError, match="no LoRA weights"):
        ckpt.sniff_lora_format({"img_in.weight": torch.zeros(1)})


# ----------------------------------------------------------------------------------------------------- DiT keys


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model.", "pipe.dit."])
def test_fixture_diffsynth_to_bfl_bit_exact(prefix, dit_bfl, dit_diffsynth):
    sd_bfl, source = ckpt.to_bfl({prefix + k: v for k, v in dit_diffsynth.items()})
    assert source == "diffsynth"
    assert_same_tensors(sd_bfl, dit_bfl)
    assert_same_tensors(ckpt.bfl_to_diffsynth({prefix + k: v for k, v in dit_bfl.items()}), dit_diffsynth)


def test_final_adaln_halves_are_swapped(dit_bfl, dit_diffsynth):
    bfl, diffsynth = dit_bfl["final_layer.adaLN_modulation.1.weight"], dit_diffsynth["final_norm_out.linear.weight"]
    assert torch.equal(bfl[:64], diffsynth[64:]) and not torch.equal(bfl, diffsynth)


def test_fixture_bfl_and_diffsynth_to_diffusers_load_strictly_and_round_trip(dit_bfl, dit_diffsynth):
    model = FluxTransformer2DModel(**TINY_DIFFUSERS_CONFIG)
    from_bfl = ckpt.bfl_to_diffusers(dit_bfl)
    model.load_state_dict(from_bfl, strict=True)
    assert_same_tensors(ckpt.diffusers_to_bfl(from_bfl), dit_bfl)
    from_diffsynth = ckpt.convert_dit(dit_diffsynth, "diffusers")
    model.load_state_dict(from_diffsynth, strict=True)
    assert_same_tensors(from_diffsynth, from_bfl)
    assert_same_tensors(ckpt.convert_dit(from_diffsynth, "diffsynth"), dit_diffsynth)
    assert ckpt.to_bfl(model.state_dict())[1] == "diffusers"


def _pack(latent: torch.Tensor) -> torch.Tensor:
    """[B,C,H,W] -> [B,(H/2)(W/2),C*4], channel-major (c, p, q) as the reference packs 2x2 patches."""
    b, c, h, w = latent.shape
    return latent.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def _unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b = tokens.shape[0]
    return tokens.view(b, h // 2, w // 2, -1, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, -1, h, w)


@pytest.mark.parametrize("run, with_lora", [("run_depth_1step_fp32", False), ("run_depth_1step_lora_fp32", True)])
def test_converted_weights_reproduce_the_reference_velocity_in_diffusers(run, with_lora, dit_diffsynth):
    """Independent check of the whole key map (piece order, adaLN halves) and of LoRA merging: the reference DiT's
    recorded velocity, recomputed by diffusers' own FluxTransformer2DModel from our converted weights."""
    recorded = ckpt.load_state_dict(FIXTURES / f"{run}.safetensors")
    sd_bfl, _ = ckpt.to_bfl(dit_diffsynth)
    if with_lora:
        sd_bfl = ckpt.merge_lora(sd_bfl, ckpt.load_lora_file(FIXTURES / "lora_kohya.safetensors"))
    model = FluxTransformer2DModel(**TINY_DIFFUSERS_CONFIG)
    model.load_state_dict(ckpt.bfl_to_diffusers(sd_bfl), strict=True)
    latent = recorded["step0_latents_in"]  # [1,16,6,8]
    target_tokens = _pack(latent)  # [1,12,64]
    with torch.no_grad():
        out = model(
            hidden_states=torch.cat([target_tokens, recorded["context_tokens_packed"]], dim=1),  # [1,24,64]
            encoder_hidden_states=recorded["prompt_emb_in"],
            pooled_projections=recorded["pooled_prompt_emb_in"],
            timestep=recorded["timesteps_to_dit"] / 1000,  # diffusers multiplies by 1000 inside
            img_ids=torch.cat([recorded["target_ids"], recorded["context_ids"]], dim=1)[0],
            txt_ids=torch.zeros(512, 3),
            guidance=recorded["guidance_in"],
            return_dict=False,
        )[0]
    velocity = _unpack(out[:, : target_tokens.shape[1]], *latent.shape[2:])
    torch.testing.assert_close(velocity, recorded["step0_velocity"], rtol=0, atol=1e-5)


def test_other_size_dit_round_trips_through_all_namings():
    config = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=3, attention_head_dim=32,
                  num_attention_heads=3, joint_attention_dim=24, pooled_projection_dim=20, guidance_embeds=False,
                  axes_dims_rope=(8, 12, 12))
    reference = randomized(FluxTransformer2DModel(**config), seed=1).state_dict()
    sd_bfl, source = ckpt.to_bfl(reference)
    assert source == "diffusers" and sd_bfl["single_blocks.2.linear1.weight"].shape == (96 * 3 + 384, 96)
    diffsynth = ckpt.bfl_to_diffsynth(sd_bfl)
    assert_same_tensors(ckpt.convert_dit(diffsynth, "diffusers"), reference)
    assert_same_tensors(ckpt.diffsynth_to_bfl(diffsynth), sd_bfl)

    arch = ckpt.infer_dit_architecture(sd_bfl, {"axes_dims_rope": [8, 12, 12]})
    assert (arch.hidden_size, arch.num_heads, arch.head_dim, arch.guidance_embeds) == (96, 3, 32, False)
    rebuilt = FluxTransformer2DModel(**arch.to_diffusers_config())
    rebuilt.load_state_dict(ckpt.bfl_to_diffusers(sd_bfl), strict=True)


def test_unexpected_and_missing_dit_keys_are_errors(dit_bfl):
    with pytest.raises(CheckpointError, match="unexpected keys.*img_in.extra"):
        ckpt.to_bfl({**dit_bfl, "img_in.extra": torch.zeros(1)})
    incomplete = {k: v for k, v in dit_bfl.items() if not k.startswith("double_blocks.1.txt_mlp.2")}
    with pytest.raises(CheckpointError, match="missing modules double_blocks.1.txt_mlp.2"):
        ckpt.convert_dit(incomplete, "diffusers")
    partial = {k: v for k, v in ckpt.bfl_to_diffusers(dit_bfl).items() if "transformer_blocks.0.attn.to_k." not in k}
    with pytest.raises(CheckpointError, match="incomplete"):
        ckpt.diffusers_to_bfl(partial)


# ----------------------------------------------------------------------------------------------------- VAE keys


def test_fixture_vae_matches_diffusers_converter_and_round_trips(vae_bfl):
    converted = ckpt.vae_to_diffusers(vae_bfl)
    assert_same_tensors(converted, convert_ldm_vae_checkpoint(dict(vae_bfl), TINY_VAE_CONFIG))
    AutoencoderKL(**TINY_VAE_CONFIG).load_state_dict(converted, strict=True)
    config = ckpt.infer_vae_architecture(vae_bfl).to_diffusers_config()
    assert {key: config[key] for key in TINY_VAE_CONFIG} == {**TINY_VAE_CONFIG, "block_out_channels": [32, 64, 64, 64]}
    AutoencoderKL(**config).load_state_dict(converted, strict=True)
    assert_same_tensors(ckpt.vae_diffusers_to_bfl(converted), vae_bfl)
    assert_same_tensors(ckpt.vae_to_diffusers({f"first_stage_model.{k}": v for k, v in converted.items()}), converted)


def test_vae_unknown_keys_are_errors(vae_bfl):
    with pytest.raises(CheckpointError, match="unexpected keys.*encoder.down.0.extra"):
        ckpt.vae_to_diffusers({**vae_bfl, "encoder.down.0.extra.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="not a VAE"):
        ckpt.vae_to_diffusers({"img_in.weight": torch.zeros(1)})


# ----------------------------------------------------------------------------------------------------- architecture


def test_dit_architecture_needs_axes_for_non_flux_head_dim(dit_bfl):
    unknown_axes = ckpt.infer_dit_architecture(dit_bfl)
    assert unknown_axes.axes_dims_rope is None
    with pytest.raises(CheckpointError) as err:
        unknown_axes.to_diffusers_config()
    assert "axes_dims_rope" in str(err.value) and "config.json" in str(err.value)
    arch = ckpt.infer_dit_architecture(dit_bfl, {"axes_dims_rope": [4, 6, 6], "_class_name": "FluxTransformer2DModel",
                                                 "_diffusers_version": "0.42.1", "num_layers": 2})
    assert arch == ckpt.DiTArchitecture(hidden_size=64, num_heads=4, head_dim=16, num_double_blocks=2,
                                        num_single_blocks=2, in_channels=64, out_channels=64, text_dim=32,
                                        pooled_dim=32, guidance_embeds=True, mlp_ratio=4.0, axes_dims_rope=(4, 6, 6))
    assert arch.to_diffusers_config() == {**TINY_DIFFUSERS_CONFIG, "out_channels": 64, "axes_dims_rope": [4, 6, 6]}


@pytest.mark.parametrize("config, words", [
    ({"axes_dims_rope": [4, 6, 6], "num_layers": 19}, "num_layers=19.*num_layers=2"),
    ({"axes_dims_rope": [4, 6, 6], "joint_attention_dim": 4096}, "joint_attention_dim=4096.*=32"),
    ({"axes_dims_rope": [16, 56, 56]}, "sums to 128.*head dim is 16"),
])
def test_contradicting_config_is_an_error(dit_bfl, config, words):
    with pytest.raises(CheckpointError, match=words):
        ckpt.infer_dit_architecture(dit_bfl, config)


def test_load_config_json_errors(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        ckpt.load_config_json(tmp_path / "bad.json")
    with pytest.raises(CheckpointError, match="JSON object"):
        ckpt.load_config_json(tmp_path / "list.json")
    with pytest.raises(CheckpointError, match="config.json"):
        ckpt.load_config_json(tmp_path)


# ----------------------------------------------------------------------------------------------------- LoRA


def test_kohya_fixture_merges_as_w_plus_up_down(dit_bfl, lora_kohya_sd):
    lora = ckpt.load_lora(lora_kohya_sd)
    assert len(lora) == 26 and {pair.scale for pair in lora.values()} == {1.0}
    assert {"double_blocks.0.img_mod.lin", "single_blocks.1.modulation.lin", "single_blocks.0.linear1"} <= set(lora)
    merged = ckpt.merge_lora(dit_bfl, lora)
    changed = 0
    for key, weight in dit_bfl.items():
        kohya = "lora_unet_" + key.removesuffix(".weight").replace(".", "_")
        if key.endswith(".weight") and f"{kohya}.lora_up.weight" in lora_kohya_sd:
            expected = weight + lora_kohya_sd[f"{kohya}.lora_up.weight"] @ lora_kohya_sd[f"{kohya}.lora_down.weight"]
            torch.testing.assert_close(merged[key], expected, rtol=0, atol=1e-6)
            changed += 1
        else:
            assert merged[key] is weight
    assert changed == 26


def test_kohya_alpha_other_than_rank_scales_the_update(dit_bfl, lora_kohya_sd):
    sd = {k: (torch.tensor(8) if k.endswith(".alpha") else v) for k, v in lora_kohya_sd.items()}
    lora = ckpt.load_lora(sd)
    assert {pair.scale for pair in lora.values()} == {2.0}
    key, module = "double_blocks.1.txt_attn.qkv.weight", "lora_unet_double_blocks_1_txt_attn_qkv"
    merged = ckpt.merge_lora(dit_bfl, lora, strength=0.5)
    expected = dit_bfl[key] + sd[f"{module}.lora_up.weight"] @ sd[f"{module}.lora_down.weight"]  # 0.5 * 8/4 = 1
    torch.testing.assert_close(merged[key], expected, rtol=0, atol=1e-6)


def _varied_lora(lora_kohya_sd) -> dict:
    """The fixture LoRA plus non-unit scales, another rank and the final adaLN (whose rows are swapped)."""
    lora = ckpt.load_lora(lora_kohya_sd)
    generator = torch.Generator().manual_seed(5)
    lora["single_blocks.0.linear1"].scale = 0.5
    lora["double_blocks.1.img_attn.qkv"].scale = 3.0
    lora["final_layer.adaLN_modulation.1"] = ckpt.LoraPair(torch.randn(2, 64, generator=generator),
                                                           torch.randn(128, 2, generator=generator), 1.5)
    return lora


@pytest.mark.parametrize("style", ["kohya", "diffsynth_peft", "diffusers_peft"])
def test_lora_round_trip_through_each_style_preserves_every_delta(style, tmp_path, lora_kohya_sd):
    lora = _varied_lora(lora_kohya_sd)
    metadata = None
    if style == "kohya":
        sd = ckpt.lora_to_kohya(lora)
    elif style == "diffsynth_peft":
        sd = ckpt.lora_to_diffsynth_peft(lora)
    else:
        sd, metadata = ckpt.lora_to_diffusers_peft(lora)
    path = tmp_path / "lora.safetensors"
    ckpt.save_safetensors_atomic(sd, path, metadata)
    assert ckpt.sniff_lora_format(sd) == style
    back = ckpt.load_lora_file(path)
    assert sorted(back) == sorted(lora)
    for module, pair in lora.items():
        torch.testing.assert_close(back[module].delta(), pair.delta(), rtol=0, atol=1e-6)


def test_diffusers_loads_our_diffusers_peft_lora_identically(tmp_path, dit_bfl, lora_kohya_sd):
    lora = _varied_lora(lora_kohya_sd)
    sd, metadata = ckpt.lora_to_diffusers_peft(lora, ckpt.infer_dit_architecture(dit_bfl, TINY_DIFFUSERS_CONFIG))
    ckpt.save_safetensors_atomic(sd, tmp_path / "lora.safetensors", metadata)
    model = FluxTransformer2DModel(**TINY_DIFFUSERS_CONFIG)
    model.load_state_dict(ckpt.bfl_to_diffusers(dit_bfl))
    loaded, loaded_metadata = FluxKontextPipeline.lora_state_dict(tmp_path / "lora.safetensors",
                                                                  return_lora_metadata=True)
    model.load_lora_adapter(loaded, prefix="transformer", metadata=loaded_metadata)
    model.fuse_lora()
    model.unload_lora()
    ours = ckpt.bfl_to_diffusers(ckpt.merge_lora(dit_bfl, lora))
    reference = model.state_dict()
    for key in ours:
        torch.testing.assert_close(ours[key], reference[key], rtol=0, atol=1e-5)


def test_peft_lora_merged_by_us_equals_peft_merge_and_unload():
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    model = randomized(FluxTransformer2DModel(**TINY_DIFFUSERS_CONFIG), seed=2)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    config = LoraConfig(
        r=4, lora_alpha=8,
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                        "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
                        "norm1_context.linear", "proj_out", "norm.linear", "norm_out.linear", "x_embedder"],
        rank_pattern={"single_transformer_blocks.1.attn.to_k": 2}, alpha_pattern={"transformer_blocks.0.attn.to_q": 2},
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    lora_sd = get_peft_model_state_dict(peft_model)  # keys: base_model.model.transformer_blocks.0.attn.to_q.lora_A...
    metadata = {"lora_adapter_metadata": json.dumps(config.to_dict(), default=list)}

    lora = ckpt.load_lora(lora_sd, metadata)
    assert lora["single_blocks.0.linear1"].up.shape == (64 * 3 + 256, 12)  # proj_mlp untrained: zero rows
    ours = ckpt.bfl_to_diffusers(ckpt.merge_lora(ckpt.diffusers_to_bfl(base), lora))
    reference = peft_model.merge_and_unload().state_dict()
    assert sorted(ours) == sorted(reference)
    assert sum(not torch.equal(base[k], reference[k]) for k in base) == 41  # 14 per double, 5 per single, 3 top
    for key in reference:
        torch.testing.assert_close(ours[key], reference[key], rtol=0, atol=1e-5)


def test_diffusers_lora_missing_pieces_become_zero_rows():
    generator = torch.Generator().manual_seed(4)
    q_down, q_up = torch.randn(2, 8, generator=generator), torch.randn(8, 2, generator=generator)
    v_down, v_up = torch.randn(3, 8, generator=generator), torch.randn(8, 3, generator=generator)
    sd = {"transformer_blocks.0.attn.to_q.lora_A.weight": q_down, "transformer_blocks.0.attn.to_q.lora_B.weight": q_up,
          "transformer_blocks.0.attn.to_v.lora_A.weight": v_down, "transformer_blocks.0.attn.to_v.lora_B.weight": v_up}
    pair = ckpt.load_lora(sd)["double_blocks.0.img_attn.qkv"]
    delta = pair.delta()
    assert delta.shape == (24, 8)
    torch.testing.assert_close(delta[:8], q_up @ q_down)
    assert not delta[8:16].any()
    torch.testing.assert_close(delta[16:], v_up @ v_down)


def test_lora_for_another_base_model_is_an_error(dit_bfl, lora_kohya_sd):
    lora = ckpt.load_lora(lora_kohya_sd)
    wider = {**dit_bfl, "double_blocks.0.img_attn.qkv.weight": torch.zeros(288, 96)}
    with pytest.raises(CheckpointError, match=r"another base model.*img_attn.qkv expects \[192, 64\].*\[288, 96\]"):
        ckpt.merge_lora(wider, lora)
    smaller = {k: v for k, v in dit_bfl.items() if not k.startswith("single_blocks.1.")}
    with pytest.raises(CheckpointError, match="another base model.*single_blocks.1"):
        ckpt.merge_lora(smaller, lora)


def test_malformed_loras_are_errors(lora_kohya_sd):
    no_up = {k: v for k, v in lora_kohya_sd.items() if k != "lora_unet_single_blocks_0_linear1.lora_up.weight"}
    with pytest.raises(CheckpointError, match="lora_unet_single_blocks_0_linear1"):
        ckpt.load_lora(no_up)
    with pytest.raises(CheckpointError, match="not Linear layers"):
        ckpt.load_lora({**lora_kohya_sd, "lora_unet_img_attn_bogus.lora_down.weight": torch.zeros(4, 2),
                        "lora_unet_img_attn_bogus.lora_up.weight": torch.zeros(2, 4)})
    with pytest.raises(CheckpointError, match="unsupported keys"):
        ckpt.load_lora({**lora_kohya_sd, "lora_unet_single_blocks_0_linear1.dora_scale": torch.zeros(1)})


def test_package_does_not_import_diffusers_or_transformers():
    code = "import sys, e2p_core.checkpoints; print(sorted({'diffusers', 'transformers', 'peft'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent, capture_output=True,
                            text=True, check=True)
    assert result.stdout.strip() == "[]"
