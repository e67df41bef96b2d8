"""FE2E on ComfyUI's own Flux model and VAE (nodes/comfy_fe2e.py) against the engine path and the official fixtures.

The tiny Step1X-Edit checkpoint (hidden 64) is split into ComfyUI's Flux MODEL (the LoRA as patches) and the
connector; the tiny VAE is a real ``comfy.sd.VAE``. float32 on CPU: the paths differ in summation order only
(atol 1e-5; unit normals 1e-4 as in the fixture README). The nodes over this backend, on a 3072-wide test DiT:
tests/test_nodes_fe2e.py.
"""

import json
import shutil

import torch
from comfy_support import load_pack
from safetensors.torch import load_file

from e2p_core.fe2e import perceive_fe2e as perceive_engine
from e2p_core.images import load_image_rgb
from fe2e_support import (
    DIT, DIT_CONFIG, FP32_NORMAL_UNIT_ATOL, IMAGE, LORA, PROCESSING_HW, PROMPT_CACHE, VAE, fe2e_models, load_run,
    prompt_cache,
)
from test_fe2e_parity import assert_stages, stages

pack = load_pack()
from e2p_pack.e2p_core.connector import load_prompt_cache  # noqa: E402  (the pack's copies, as ComfyUI runs them)
from e2p_pack.e2p_core.fe2e import perceive_fe2e  # noqa: E402
from e2p_pack.nodes.comfy_fe2e import ComfyPosteriorCodec, ComfyStep1XDenoiser, load_fe2e_model  # noqa: E402

ATOL = 1e-5


def tiny_fe2e_vae():
    """A real ``comfy.sd.VAE`` around the FE2E fixtures' tiny VAE (ch 32, mult 1,1,1,2, identity quant convs)."""
    import comfy.sd

    state_dict = load_file(VAE)
    ddconfig = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 1, 1, 2], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    identity = {"quant_conv.weight": torch.eye(32).view(32, 32, 1, 1), "quant_conv.bias": torch.zeros(32),
                "post_quant_conv.weight": torch.eye(16).view(16, 16, 1, 1), "post_quant_conv.bias": torch.zeros(16)}
    vae = comfy.sd.VAE(sd={**state_dict, **identity}, config={"params": {"ddconfig": ddconfig, "embed_dim": 16}},
                       dtype=torch.float32)
    vae.latent_channels = 16
    return vae


def test_comfy_native_fe2e_equals_the_engine_and_the_official_run(tmp_path):
    dit = shutil.copy(DIT, tmp_path)
    (tmp_path / "step1x-edit-i1258.json").write_text(json.dumps(json.loads(DIT_CONFIG.read_text())))
    model, connector = load_fe2e_model(dit, lora_path=LORA)
    denoiser = ComfyStep1XDenoiser(model, connector)
    codec = ComfyPosteriorCodec(tiny_fe2e_vae(), denoiser.device)
    run = load_run("sd_fp32_lora")
    image = load_image_rgb(IMAGE)
    comfy = perceive_fe2e(denoiser, codec, image, load_prompt_cache(PROMPT_CACHE),
                          encode_noise=run["vae_sample_eps"], resolution=PROCESSING_HW)
    engine_denoiser, engine_codec = fe2e_models(torch.float32, True)
    engine = perceive_engine(engine_denoiser, engine_codec, image, prompt_cache(), encode_noise=run["vae_sample_eps"],
                             resolution=PROCESSING_HW)
    for key, value in stages(engine).items():  # unit normals: the fixtures' 1e-4 (small vectors amplify rounding)
        atol = FP32_NORMAL_UNIT_ATOL if key == "normal" else ATOL
        torch.testing.assert_close(getattr(comfy, key), value, atol=atol, rtol=0, msg=key)
    assert_stages(stages(comfy), run, torch.float32, 1)
