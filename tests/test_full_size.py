"""The key maps at the real FLUX.1 Kontext size (19 double + 38 single blocks, hidden 3072, ae with 128..512
channels), on the meta device: shapes and names only, no memory. The tiny fixtures check the values; these check
that nothing depends on the tiny sizes and that our BFL naming is exactly what diffusers' own single-file
converter expects from a real ``flux1-kontext-dev.safetensors``."""

import pytest
import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from diffusers.loaders.single_file_utils import (
    convert_flux_transformer_checkpoint_to_diffusers,
    convert_ldm_vae_checkpoint,
)

from e2p_core.backends.diffusers_backend import build_transformer
from e2p_core.checkpoints import (
    LoraPair,
    bfl_to_diffsynth,
    bfl_to_diffusers,
    diffusers_to_bfl,
    infer_dit_architecture,
    infer_vae_architecture,
    load_lora,
    lora_to_kohya,
    merge_lora,
    to_bfl,
    vae_diffusers_to_bfl,
    vae_to_diffusers,
)

FLUX_VAE_CONFIG = dict(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                       block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                       norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                       use_post_quant_conv=False)


def shapes(state_dict: dict) -> dict[str, tuple]:
    return {key: tuple(value.shape) for key, value in state_dict.items()}


@pytest.fixture(scope="module")
def kontext_diffusers():
    with torch.device("meta"):
        return FluxTransformer2DModel(guidance_embeds=True).state_dict()  # FLUX.1 [dev] / Kontext sizes


@pytest.fixture(scope="module")
def kontext_bfl(kontext_diffusers):
    return diffusers_to_bfl(kontext_diffusers)


def test_our_bfl_naming_is_what_diffusers_single_file_converter_reads(kontext_bfl, kontext_diffusers):
    prefixed = {f"model.diffusion_model.{key}": value for key, value in kontext_bfl.items()}  # as ComfyUI saves
    remaining = dict(prefixed)
    converted = convert_flux_transformer_checkpoint_to_diffusers(remaining)  # pops what it consumes
    assert shapes(converted) == shapes(kontext_diffusers)
    assert shapes(bfl_to_diffusers(to_bfl(prefixed)[0])) == shapes(kontext_diffusers)
    assert "double_blocks.18.img_attn.qkv.weight" in kontext_bfl and "single_blocks.37.linear1.weight" in kontext_bfl


def test_diffsynth_layout_has_the_released_checkpoints_780_tensors(kontext_bfl):
    """E2P-SPEC §3.1: the released full checkpoints hold 780 tensors in DiffSynth naming."""
    diffsynth = bfl_to_diffsynth(kontext_bfl)
    assert len(diffsynth) == 780
    assert diffsynth["single_blocks.0.to_qkv_mlp.weight"].shape == (21504, 3072)
    assert diffsynth["final_norm_out.linear.weight"].shape == (6144, 3072)
    assert shapes(to_bfl(diffsynth)[0]) == shapes(kontext_bfl)


def test_real_size_architecture_is_inferred_without_a_config(kontext_bfl):
    arch = infer_dit_architecture(kontext_bfl)
    assert (arch.hidden_size, arch.num_heads, arch.head_dim) == (3072, 24, 128)
    assert (arch.num_double_blocks, arch.num_single_blocks) == (19, 38)
    assert (arch.text_dim, arch.pooled_dim, arch.guidance_embeds, arch.mlp_ratio) == (4096, 768, True, 4.0)
    assert arch.axes_dims_rope == (16, 56, 56)
    transformer = build_transformer(bfl_to_diffusers(kontext_bfl), arch, torch.bfloat16, "meta")  # strict load
    assert sum(p.numel() for p in transformer.parameters()) == 11_901_408_320


def test_released_lora_layout_merges_into_the_real_base(kontext_bfl):
    """A kohya LoRA over the trainer's 13 module types: 19 x 10 + 38 x 3 = 304 pairs, modulation included."""
    double = ("img_mod.lin", "txt_mod.lin", "img_attn.qkv", "txt_attn.qkv", "img_attn.proj", "txt_attn.proj",
              "img_mlp.0", "img_mlp.2", "txt_mlp.0", "txt_mlp.2")
    single = ("linear1", "linear2", "modulation.lin")
    modules = [f"double_blocks.{i}.{m}" for i in range(19) for m in double]
    modules += [f"single_blocks.{i}.{m}" for i in range(38) for m in single]
    pairs = {}
    for module in modules:
        out_features, in_features = kontext_bfl[f"{module}.weight"].shape
        pairs[module] = LoraPair(torch.empty(2, in_features, device="meta"), torch.empty(out_features, 2,
                                                                                           device="meta"))
    kohya = lora_to_kohya(pairs)
    assert "lora_unet_double_blocks_0_img_mod_lin.lora_down.weight" in kohya
    reloaded = load_lora(kohya)
    assert len(reloaded) == 304
    merged = merge_lora(kontext_bfl, reloaded)
    assert shapes(merged) == shapes(kontext_bfl)


def test_flux_vae_maps_both_ways_like_diffusers():
    with torch.device("meta"):
        vae = AutoencoderKL(**FLUX_VAE_CONFIG)
    diffusers_sd = vae.state_dict()
    bfl = vae_diffusers_to_bfl(diffusers_sd)
    assert "decoder.up.3.block.2.conv1.weight" in bfl and bfl["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert shapes(vae_to_diffusers(bfl)) == shapes(diffusers_sd)
    reference = convert_ldm_vae_checkpoint(bfl, vae.config)
    assert shapes(reference) == shapes(diffusers_sd)
    arch = infer_vae_architecture(bfl)
    assert arch.block_out_channels == (128, 256, 512, 512) and arch.layers_per_block == 2
    assert arch.latent_channels == 16 and not arch.use_quant_conv
