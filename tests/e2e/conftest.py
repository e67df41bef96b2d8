"""Session fixtures of the end-to-end tests: one real ComfyUI server with the pack, test weights and input images.

Everything lives in one temporary base directory (models ~2.4 GB, input, output, user, the server log), created
once per session and deleted at its end; the server is stopped by its PID whatever happens (see comfy_server).
"""

from __future__ import annotations

import shutil
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save

from e2p_core.checkpoints import LoraPair, lora_to_kohya, save_safetensors_atomic
from e2p_core.hub import MODEL_FILES
from hub_support import FakeHub

from .comfy_server import ComfyServer
from .models import (
    write_test_dit,
    write_test_fe2e_dit,
    write_test_fe2e_lora,
    write_test_prompt_cache,
    write_test_prompt_embeddings,
    write_test_vae,
)
from .pictures import background, scene

# File names in the server's model folders; all of them are test files built here, none is a real model.
TEST_DIT = "e2p_test_flux_3072_1x1.safetensors"
TEST_VAE = "e2p_test_flux_ae.safetensors"
TEST_LORA = "e2p_test_lora_kohya.safetensors"
TEST_FE2E_DIT = "e2p_test_step1x_3072_1x1.safetensors"  # FE2E: no guidance embedder, with a connector
TEST_FE2E_LORA = "e2p_test_fe2e_lora_kohya.safetensors"
TEST_PROMPT_CACHE = "no_info.npz"  # FE2E's cached empty prompt, under the name users have
BROKEN_EMBEDDINGS = "e2p_test_broken.safetensors"  # a safetensors file without the prompt-embedding tensors
# Input images: an odd size and aspect ratio, so any resize/pad/crop slip shows as a wrong output size.
ODD_IMAGE = "e2p_odd_83x61.png"
ODD_SIZE_WH = (83, 61)
BACKGROUND_IMAGE = "e2p_background_96x80.png"


@dataclass
class ComfyE2E:
    server: ComfyServer
    base_dir: Path
    start_s: float  # server start until /system_stats answered
    hub: FakeHub  # the server's HF_ENDPOINT; it serves the test LoRA as Seq2Tri/Edit2Perceive depth_lora.safetensors

    @property
    def input_dir(self) -> Path:
        return self.base_dir / "input"


@pytest.fixture(scope="session")
def comfy() -> Iterator[ComfyE2E]:
    base_dir = Path(tempfile.mkdtemp(prefix="e2p-e2e-comfy-"))
    with FakeHub() as hub:
        server = ComfyServer(base_dir, env={"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0",
                                            "HF_HOME": str(base_dir / "hf_home")})
        try:
            _write_models(base_dir / "models")
            _write_inputs(base_dir / "input")
            lora = MODEL_FILES["depth_lora"].hub  # not in models/loras: the loader lists it as a download
            hub.add_file(lora.repo, lora.path, save(lora_to_kohya(_test_lora())))
            started = time.monotonic()
            server.start()
            yield ComfyE2E(server, base_dir, time.monotonic() - started, hub)
        finally:
            server.stop()
            shutil.rmtree(base_dir, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test that used the server shows the end of the server's log (tracebacks of node errors are there)."""
    report = (yield).get_result()
    comfy_e2e = getattr(item, "funcargs", {}).get("comfy")
    if report.failed and comfy_e2e is not None:
        report.sections.append(("ComfyUI server log (last 6000 characters)", comfy_e2e.server.log_text()[-6000:]))


def _write_models(models: Path) -> None:
    for folder in ("diffusion_models", "vae", "loras", "e2p_prompts"):
        (models / folder).mkdir(parents=True, exist_ok=True)
    write_test_dit(models / "diffusion_models" / TEST_DIT)
    write_test_vae(models / "vae" / TEST_VAE)
    write_test_prompt_embeddings(models / "e2p_prompts")
    save_safetensors_atomic({"not_prompt_embeds": torch.zeros(1, 4)}, models / "e2p_prompts" / BROKEN_EMBEDDINGS)
    save_safetensors_atomic(lora_to_kohya(_test_lora()), models / "loras" / TEST_LORA)
    write_test_fe2e_dit(models / "diffusion_models" / TEST_FE2E_DIT)
    write_test_fe2e_lora(models / "loras" / TEST_FE2E_LORA)
    write_test_prompt_cache(models / "e2p_prompts" / TEST_PROMPT_CACHE)


def _test_lora(rank: int = 4) -> dict[str, LoraPair]:
    """A small rank-4 LoRA on two fused Linears of the test DiT, in BFL module names."""
    shapes = {"double_blocks.0.img_attn.qkv": (9216, 3072), "single_blocks.0.linear1": (21504, 3072)}
    pairs = {}
    for module, (rows, cols) in shapes.items():
        generator = torch.Generator().manual_seed(zlib.crc32(module.encode()))
        pairs[module] = LoraPair(0.01 * torch.randn(rank, cols, generator=generator).to(torch.bfloat16),
                                 0.01 * torch.randn(rows, rank, generator=generator).to(torch.bfloat16))
    return pairs


def _write_inputs(input_dir: Path) -> None:
    Image.fromarray(scene(*ODD_SIZE_WH)).save(input_dir / ODD_IMAGE)
    Image.fromarray(background(96, 80)).save(input_dir / BACKGROUND_IMAGE)
