"""The exported weights load in ``e2p_core`` (and in the kohya/BFL layouts ComfyUI reads) and reproduce the trained
model's predictions through ``e2p_core.pipeline.perceive``, timestep-embedding variant included."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FIXTURES, TINY_DIT_CONFIG
from e2p_core.backends.diffusers_backend import DiffusersDenoiser, ReferenceFluxTransformer, load_diffusers_backend
from e2p_core.checkpoints import load_state_dict, read_metadata
from e2p_core.errors import CheckpointError
from e2p_core.pipeline import perceive
from e2p_core.weights import load_dit, load_vae
from train.model import add_lora
from train.trainer import train
from train_support.runs import one_thread, tiny_config, write_tiny_setup  # noqa: F401 (fixture)

RELEASED_LORA = load_file(FIXTURES / "lora_kohya.safetensors")  # written by the reference trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def predict(denoiser, codec, prompt, task: str) -> torch.Tensor:
    image = np.random.default_rng(1).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    point_map = np.zeros((40, 56), np.float32) if task == "matting" else None
    if point_map is not None:
        point_map[10:30, 20:40] = 1.0
    return perceive(denoiser, codec, image, task, prompt, point_map=point_map, resolution=64).output


@pytest.mark.parametrize("task, time_embedding", [("depth", "bf16"), ("matting", "exact")])
def test_exported_lora_reproduces_the_trained_model(tmp_path, task, time_embedding):
    setup = write_tiny_setup(tmp_path / "setup", task, samples=2)
    result = train(tiny_config(setup, task, tmp_path / "run", max_steps=3, learning_rate=1e-2,
                               time_embedding=time_embedding))
    path = result.export_path
    assert path == tmp_path / "run" / f"{task}_lora.safetensors"
    exported = load_file(path)
    # the reference trainer's kohya layout: same 26 modules (10 per double block, 3 per single), .alpha = rank
    assert set(exported) == set(RELEASED_LORA)
    assert all(exported[key].item() == 4 for key in exported if key.endswith(".alpha"))
    assert read_metadata(path)["e2p.time_embedding"] == time_embedding

    dit = load_dit(FIXTURES / "dit_bfl.safetensors", TINY_DIT_CONFIG, loras=[(path, 1.0)])
    assert dit.time_embedding == time_embedding  # read from the LoRA: the base file records none
    denoiser, codec = load_diffusers_backend(dit, load_vae(FIXTURES / "vae_bfl.safetensors"), torch.float32, "cpu")
    from_file = predict(denoiser, codec, result.prompt, task)
    in_memory = predict(DiffusersDenoiser(result.transformer.eval(), torch.float32, "cpu"), result.codec,
                        result.prompt, task)
    base = load_dit(FIXTURES / "dit_bfl.safetensors", TINY_DIT_CONFIG)
    untrained = predict(*load_diffusers_backend(base, load_vae(FIXTURES / "vae_bfl.safetensors"), torch.float32,
                                                "cpu", time_embedding), result.prompt, task)
    assert (untrained - in_memory).abs().max() > 1e-2  # training changed the prediction ...
    torch.testing.assert_close(from_file, in_memory, atol=2e-5, rtol=0)  # ... and the export carries the change


def test_exported_full_fine_tune_is_a_bfl_diffusion_model_with_the_trained_outputs(tmp_path):
    setup = write_tiny_setup(tmp_path / "setup", "normal", samples=2)
    result = train(tiny_config(setup, "normal", tmp_path / "run", mode="full", max_steps=2, learning_rate=1e-3))
    path = result.export_path
    assert path.name == "normal_bfl.safetensors"
    exported = load_state_dict(path)
    base = load_state_dict(FIXTURES / "dit_bfl.safetensors")
    assert exported.keys() == base.keys()  # BFL naming, as ComfyUI's UNETLoader and e2p_core read it
    assert any(not torch.equal(exported[key], base[key]) for key in base)
    dit = load_dit(path, TINY_DIT_CONFIG)
    assert dit.time_embedding == "bf16" and dit.source_format == "bfl"
    denoiser, codec = load_diffusers_backend(dit, load_vae(FIXTURES / "vae_bfl.safetensors"), torch.float32, "cpu")
    from_file = predict(denoiser, codec, result.prompt, "normal")
    in_memory = predict(DiffusersDenoiser(result.transformer.eval(), torch.float32, "cpu"), result.codec,
                        result.prompt, "normal")
    torch.testing.assert_close(from_file, in_memory, atol=1e-6, rtol=0)


def test_full_size_lora_is_the_reference_304_pairs_of_306m_parameters():
    """E2P-SPEC §3.3: rank 64 on 10 Linears per double block and 3 per single block, modulation included."""
    with torch.device("meta"):
        transformer = ReferenceFluxTransformer(guidance_embeds=True)  # FLUX.1 sizes
    assert add_lora(transformer, 64) == 304
    hidden, mlp = 3072, 12288
    double = [(hidden, 6 * hidden)] * 2 + [(hidden, 3 * hidden)] * 2 + [(hidden, hidden)] * 2 + \
        [(hidden, mlp), (mlp, hidden)] * 2  # (in, out): img/txt mod, qkv, proj, mlp.0, mlp.2
    single = [(hidden, 3 * hidden + mlp), (hidden + mlp, hidden), (hidden, 3 * hidden)]  # linear1, linear2, mod
    expected = 64 * (19 * sum(i + o for i, o in double) + 38 * sum(i + o for i, o in single))
    trainable = sum(p.numel() for p in transformer.parameters() if p.requires_grad)  # tied lora_A counted once
    assert trainable == expected == 306_315_264


def test_lora_records_override_the_base_and_must_agree(tmp_path):
    released = load_file(FIXTURES / "lora_kohya.safetensors")
    paths = {}
    for variant in ("bf16", "exact"):
        paths[variant] = tmp_path / f"{variant}.safetensors"
        save_file(released, paths[variant], metadata={"e2p.time_embedding": variant})
    base = FIXTURES / "dit_bfl.safetensors"
    assert load_dit(base, TINY_DIT_CONFIG).time_embedding is None
    assert load_dit(base, TINY_DIT_CONFIG, loras=[(paths["exact"], 1.0)]).time_embedding == "exact"
    assert load_dit(base, TINY_DIT_CONFIG, loras=[(FIXTURES / "lora_kohya.safetensors", 1.0)]).time_embedding is None
    with pytest.raises(CheckpointError, match="different timestep embeddings"):
        load_dit(base, TINY_DIT_CONFIG, loras=[(paths["bf16"], 1.0), (paths["exact"], 0.5)])
