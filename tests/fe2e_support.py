"""Shared test data for FE2E: the official-code parity fixtures in tests/fixtures/fe2e_tiny (see its README) and the
models built from them."""

import json
from functools import cache
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from e2p_core.backends.step1x_backend import load_step1x_backend
from e2p_core.connector import load_prompt_cache
from e2p_core.weights import load_step1x, load_vae

FE2E_FIXTURES = Path(__file__).parent / "fixtures" / "fe2e_tiny"
DIT = FE2E_FIXTURES / "step1x-edit-i1258.safetensors"
VAE = FE2E_FIXTURES / "vae.safetensors"
LORA = FE2E_FIXTURES / "lora_kohya_r4_a2.safetensors"
PROMPT_CACHE = FE2E_FIXTURES / "no_info.npz"
DIT_CONFIG = FE2E_FIXTURES / "dit_config.json"
VAE_CONFIG = FE2E_FIXTURES / "vae_config.json"
IMAGE = FE2E_FIXTURES / "input.png"
RUNS = ("sd_fp32", "sd_fp32_lora", "sd_bf16", "sd_bf16_lora", "ms28_fp32_lora", "ms28_bf16_lora")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PROCESSING_HW = (48, 64)  # the tiny bucket the fixtures were made at (real FE2E: 768 x 1024)

# The fixture README's tolerances: (prediction & latents, decoded & outputs); float32 unit normals 1e-4.
FP32_ATOL, FP32_NORMAL_UNIT_ATOL = 2e-5, 1e-4
BF16_ATOL = {1: (0.05, 0.03), 28: (0.05, 0.06)}


def run_info(name: str) -> dict:
    with safe_open(str(FE2E_FIXTURES / f"run_{name}.safetensors"), "pt") as handle:
        return json.loads(handle.metadata()["run"])


def load_run(name: str) -> dict[str, torch.Tensor]:
    return load_file(FE2E_FIXTURES / f"run_{name}.safetensors")


@cache
def fe2e_models(dtype: torch.dtype, lora: bool):
    weights = load_step1x(DIT, DIT_CONFIG, [(LORA, 1.0)] if lora else [], dtype)
    return load_step1x_backend(weights, load_vae(VAE, VAE_CONFIG), dtype, "cpu")


def prompt_cache():
    return load_prompt_cache(PROMPT_CACHE)
