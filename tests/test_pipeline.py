"""The pipeline on the tiny fixture model beyond the official runs: exact H x W for odd sizes and aspect ratios,
batches in order, the time-embedding variants, and import hygiene for the ComfyUI node path."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FIXTURES, TINY_DIT_CONFIG
from e2p_core.backends.diffusers_backend import load_diffusers_backend
from e2p_core.errors import InputError
from e2p_core.pipeline import perceive
from e2p_core.prompts import load_prompt_embeddings
from e2p_core.weights import load_dit, load_vae

REPO = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def tiny_models():
    dit = load_dit(FIXTURES / "dit_bfl.safetensors", TINY_DIT_CONFIG)
    return load_diffusers_backend(dit, load_vae(FIXTURES / "vae_bfl.safetensors"), torch.float32, "cpu")


def random_image(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("task", ["depth", "normal", "matting"])
@pytest.mark.parametrize("hw, resize, resolution", [
    ((37, 53), "aligned", 64),
    ((17, 301), "aligned", 96),
    ((50, 23), "aligned", "native"),
    ((41, 29), "reference", 32 * 2),
])
def test_outputs_keep_the_exact_input_size(tiny_models, prompt_files, task, hw, resize, resolution):
    denoiser, codec = tiny_models
    prompt = load_prompt_embeddings(prompt_files[task])
    with torch.no_grad():
        result = perceive(denoiser, codec, random_image(*hw, seed=0), task, prompt, resize=resize,
                          resolution=resolution, point_map=np.zeros(hw, np.float32) if task == "matting" else None)
    channels = 3 if task == "normal" else 1
    assert result.output.shape == (1, channels, *hw)
    assert torch.isfinite(result.output).all()
    if task == "normal":
        torch.testing.assert_close(result.output.norm(dim=1), torch.ones(1, *hw), atol=1e-4, rtol=0)
    else:
        assert result.output.min() >= 0 and result.output.max() <= 1


def test_batch_comes_back_in_order_and_equals_single_runs(tiny_models, prompt_files):
    denoiser, codec = tiny_models
    prompt = load_prompt_embeddings(prompt_files["depth"])
    frames = [random_image(40, 56, seed) for seed in range(3)]
    with torch.no_grad():
        batch = perceive(denoiser, codec, np.stack(frames), "depth", prompt, resolution=64).output
        singles = [perceive(denoiser, codec, frame, "depth", prompt, resolution=64).output for frame in frames]
    assert batch.shape == (3, 1, 40, 56)
    for i, single in enumerate(singles):
        torch.testing.assert_close(batch[i : i + 1], single, atol=1e-5, rtol=0)
    assert not torch.allclose(singles[0], singles[1])


def test_float_frames_like_comfyui_images(tiny_models, prompt_files):
    """ComfyUI IMAGE batches are float [B,H,W,3] in [0,1]; they give what the uint8 image gives."""
    denoiser, codec = tiny_models
    prompt = load_prompt_embeddings(prompt_files["depth"])
    frame = random_image(48, 64, seed=5)
    with torch.no_grad():
        from_uint8 = perceive(denoiser, codec, frame, "depth", prompt, resolution="native").output
        from_float = perceive(denoiser, codec, torch.from_numpy(frame / 255.0).float()[None], "depth", prompt,
                              resolution="native").output
    torch.testing.assert_close(from_float, from_uint8, atol=1e-5, rtol=0)


def test_seed_changes_noise_but_is_reproducible(tiny_models, prompt_files):
    denoiser, codec = tiny_models
    prompt = load_prompt_embeddings(prompt_files["depth"])
    frame = random_image(32, 32, seed=1)
    with torch.no_grad():
        a, b, c = (perceive(denoiser, codec, frame, "depth", prompt, seed=s, resolution="native").latent
                   for s in (42, 42, 7))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_progress_callback_sees_every_step(tiny_models, prompt_files):
    denoiser, codec = tiny_models
    seen = []
    with torch.no_grad():
        perceive(denoiser, codec, random_image(32, 32, 0), "depth", load_prompt_embeddings(prompt_files["depth"]),
                 steps=3, resolution="native", on_step=lambda i, n: seen.append((i, n)))
    assert seen == [(0, 3), (1, 3), (2, 3)]


def test_mixed_sizes_in_one_batch_are_rejected(tiny_models, prompt_files):
    denoiser, codec = tiny_models
    with pytest.raises(InputError, match="same size"):
        perceive(denoiser, codec, [random_image(32, 32, 0), random_image(32, 48, 0)], "depth",
                 load_prompt_embeddings(prompt_files["depth"]))


def test_time_embedding_variant_recorded_in_the_dit_file_is_used(tmp_path):
    """``bf16`` rounding in a float32 run changes the output, and a file that records it gets it by default."""
    from safetensors.torch import load_file, save_file

    save_file(load_file(FIXTURES / "dit_bfl.safetensors"), tmp_path / "dit.safetensors",
              metadata={"e2p.time_embedding": "bf16"})
    recorded = load_dit(tmp_path / "dit.safetensors", TINY_DIT_CONFIG)
    assert recorded.time_embedding == "bf16"
    vae = load_vae(FIXTURES / "vae_bfl.safetensors")
    denoiser, _ = load_diffusers_backend(recorded, vae, torch.float32, "cpu")
    assert denoiser.transformer.time_embedding == "bf16"
    explicit, _ = load_diffusers_backend(recorded, vae, torch.float32, "cpu", time_embedding="exact")
    assert explicit.transformer.time_embedding == "exact"


def test_node_import_path_does_not_import_diffusers_or_transformers():
    code = ("import sys; import e2p_core, e2p_core.pipeline, e2p_core.weights, e2p_core.conventions, "
            "e2p_core.prompts, e2p_core.points, e2p_core.images, e2p_core.checkpoints, e2p_core.cli; "
            "bad = [m for m in ('diffusers', 'transformers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_module_entry_point_runs_predict(tmp_path, prompt_files, dit_config_file):
    """``python -m e2p_core predict`` in a fresh interpreter, as a user runs it."""
    out = tmp_path / "normals.png"
    subprocess.run([sys.executable, "-m", "e2p_core", "predict", "--task", "normal", "--dit",
                    str(FIXTURES / "dit_diffsynth.safetensors"), "--dit-config", str(dit_config_file), "--vae",
                    str(FIXTURES / "vae_bfl.safetensors"), "--prompt-embeds", str(prompt_files["normal"]), "--image",
                    str(FIXTURES / "input.png"), "--out", str(out), "--dtype", "fp32", "--device", "cpu",
                    "--resolution", "64"], cwd=REPO, check=True)
    from PIL import Image

    with Image.open(out) as png:
        assert png.size == (64, 48) and png.mode == "RGB"
    help_text = subprocess.run([sys.executable, "-m", "e2p_core", "predict", "--help"], cwd=REPO, check=True,
                               capture_output=True, text=True).stdout
    for flag in ("--dit-config", "--lora", "--raw", "--noise", "--points", "--point-map", "--resize", "--resolution"):
        assert flag in help_text


def test_perceive_builds_no_autograd_graph(tiny_models, prompt_files):
    denoiser, codec = tiny_models
    denoiser.transformer.requires_grad_(True)
    try:
        result = perceive(denoiser, codec, random_image(32, 32, 0), "depth",
                          load_prompt_embeddings(prompt_files["depth"]), resolution="native")
    finally:
        denoiser.transformer.requires_grad_(False)
    assert not result.output.requires_grad and result.velocity.grad_fn is None


def test_mask_point_prompt_without_a_mask_is_rejected(tiny_models, prompt_files):
    from e2p_core.pipeline import PointPrompt

    denoiser, codec = tiny_models
    with pytest.raises(InputError, match="needs a mask"):
        perceive(denoiser, codec, random_image(32, 32, 0), "matting", load_prompt_embeddings(prompt_files["matting"]),
                 points=PointPrompt(mode="mask"), resolution="native")
