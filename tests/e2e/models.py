"""Deterministic test weights that ComfyUI's own loaders detect as a Flux DiT and a Flux VAE.

ComfyUI 0.3.75 recognises a Flux DiT by its BFL key layout and fixes 24 heads of 128 (``comfy/model_detection.py``),
so the smallest DiT it loads has hidden size 3072; we keep 1 double and 1 single block, the guidance embedder of
FLUX.1 Kontext [dev], and small text widths (T5 ``context_in_dim`` and CLIP ``vec_in_dim`` are read from the shapes):
about 0.5 B parameters, 1 GB in bf16. Its VAE loader reads only the latent width from the weights and builds the
full Flux ``ae`` layout otherwise (channels 128/256/512/512), so the VAE is full size (84 M parameters).

The weights are random but reproducible: every DiT tensor comes from its own generator seeded with the tensor's
name, the VAE from diffusers' default initialisation under a fixed seed. Key layouts are not written by hand: they
come from diffusers' model classes (built on the meta device for the DiT) through ``e2p_core``'s key converters.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch

from e2p_core.checkpoints import diffusers_to_bfl, save_safetensors_atomic, vae_diffusers_to_bfl
from e2p_core.checkpoints.io import write_atomically
from e2p_core.prompts import PromptEmbeddings, save_prompt_embeddings
from e2p_core.tasks import TASKS

# diffusers FluxTransformer2DModel arguments of the test DiT; ComfyUI detects the same sizes from the shapes.
TEST_DIT_CONFIG = {
    "patch_size": 1,
    "in_channels": 64,  # 16 latent channels x 2 x 2 patch
    "out_channels": 64,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 64,  # T5 width of the test prompt embeddings (FLUX: 4096)
    "pooled_projection_dim": 32,  # CLIP pooled width (FLUX: 768)
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}
TEST_PROMPT_TOKENS = 16  # T5 sequence length of the test prompt embeddings (FLUX: 512)

# The Flux ae layout (what ComfyUI's VAE loader builds for a 16-channel latent) as diffusers AutoencoderKL arguments.
FLUX_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 16,
    "norm_num_groups": 32,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}


def write_test_dit(path: Path, dtype: torch.dtype = torch.bfloat16) -> None:
    """The test DiT in BFL naming (as ComfyUI's ``diffusion_models`` files are), written atomically."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        layout = diffusers_to_bfl(FluxTransformer2DModel(**TEST_DIT_CONFIG).state_dict())
    state_dict = {name: _seeded_tensor(name, tensor.shape, dtype) for name, tensor in sorted(layout.items())}
    save_safetensors_atomic(state_dict, path)


# FE2E's test DiT: the same DiT without the guidance embedder (Step1X-Edit has none) plus a one-block connector from a
# 64-wide stand-in for Qwen2.5-VL (real: 3584) to the DiT's text width; ComfyUI detects it as a guidance-free Flux.
TEST_FE2E_DIT_CONFIG = {**TEST_DIT_CONFIG, "guidance_embeds": False}
TEST_QWEN_WIDTH = 64
TEST_PROMPT_CACHE_ROWS = 12  # the last 4 are padding (FE2E's cache pads too, and every row enters the DiT)


def write_test_fe2e_dit(path: Path, dtype: torch.dtype = torch.bfloat16) -> None:
    """The FE2E test checkpoint as Step1X-Edit ships it: the DiT in BFL naming plus ``connector.*``, atomically."""
    from diffusers import FluxTransformer2DModel

    from e2p_core.connector import CONNECTOR_PREFIX, ConnectorArchitecture, Qwen2Connector

    architecture = ConnectorArchitecture(
        in_channels=TEST_QWEN_WIDTH, hidden_size=TEST_DIT_CONFIG["joint_attention_dim"], num_attention_heads=1,
        depth=1, mlp_ratio=4.0, pooled_dim=TEST_DIT_CONFIG["pooled_projection_dim"])
    with torch.device("meta"):
        layout = diffusers_to_bfl(FluxTransformer2DModel(**TEST_FE2E_DIT_CONFIG).state_dict())
        layout.update({CONNECTOR_PREFIX + name: tensor for name, tensor in
                       Qwen2Connector(architecture).state_dict().items()})
    state_dict = {name: _seeded_tensor(name, tensor.shape, dtype) for name, tensor in sorted(layout.items())}
    save_safetensors_atomic(state_dict, path)


def write_test_fe2e_lora(path: Path, rank: int = 4) -> None:
    """A kohya LoRA for the FE2E test DiT written the way FE2E's is (float alpha = rank / 2, so the engine and the
    loaders recognise it as FE2E's) on three of its layers; seeded, float32, atomically."""
    width = TEST_DIT_CONFIG["num_attention_heads"] * TEST_DIT_CONFIG["attention_head_dim"]
    layers = {"double_blocks_0_img_attn_qkv": (3 * width, width), "double_blocks_0_txt_mlp_0": (4 * width, width),
              "single_blocks_0_linear2": (width, 5 * width)}
    state_dict = {}
    for layer, (out_features, in_features) in layers.items():
        name = f"lora_unet_{layer}"
        state_dict[f"{name}.lora_down.weight"] = _seeded_tensor(f"{name}.down", (rank, in_features), torch.float32)
        state_dict[f"{name}.lora_up.weight"] = _seeded_tensor(f"{name}.up", (out_features, rank), torch.float32)
        state_dict[f"{name}.alpha"] = torch.tensor(rank / 2)
    save_safetensors_atomic(state_dict, path)


def write_test_prompt_cache(path: Path) -> None:
    """A ``no_info.npz`` stand-in: seeded ``embeds`` [L,64] float32 and ``masks`` [L] int64 with padding rows."""
    import numpy as np

    generator = np.random.default_rng(0)
    embeds = generator.standard_normal((TEST_PROMPT_CACHE_ROWS, TEST_QWEN_WIDTH)).astype(np.float32)
    masks = (np.arange(TEST_PROMPT_CACHE_ROWS) < TEST_PROMPT_CACHE_ROWS - 4).astype(np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(name: str) -> None:
        with open(name, "wb") as handle:  # a file object: np.savez would append .npz to a name
            np.savez(handle, embeds=embeds, masks=masks)

    write_atomically(path, write)


def write_test_vae(path: Path) -> None:
    """A full-size Flux VAE in BFL naming (``ae.safetensors`` layout), float32, written atomically."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**FLUX_VAE_CONFIG)
    save_safetensors_atomic(vae_diffusers_to_bfl(vae.state_dict()), path)


def write_test_prompt_embeddings(folder: Path) -> dict[str, Path]:
    """One prompt-embeddings file per task (``<task>.safetensors``) with seeded random stand-ins for T5 and CLIP."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for task, spec in TASKS.items():
        generator = torch.Generator().manual_seed(zlib.crc32(task.encode()))
        embeddings = PromptEmbeddings(
            torch.randn(1, TEST_PROMPT_TOKENS, TEST_DIT_CONFIG["joint_attention_dim"], generator=generator),
            torch.randn(1, TEST_DIT_CONFIG["pooled_projection_dim"], generator=generator),
            spec.prompt,
        )
        files[task] = folder / f"{task}.safetensors"
        save_prompt_embeddings(embeddings, files[task])
    return files


def _seeded_tensor(name: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """RMSNorm scales are 1, biases small, weights N(0, 1/fan_in): activations stay O(1) through the blocks."""
    if name.endswith(".scale"):
        return torch.ones(shape, dtype=dtype)
    std = 0.02 if name.endswith(".bias") else shape[-1] ** -0.5
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.empty(shape, dtype=dtype).normal_(0.0, std, generator=generator)
