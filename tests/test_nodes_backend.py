"""The native ComfyUI inference path (nodes/comfy_backend.py) against the official fixtures and the diffusers path.

The tiny fixture DiT (hidden 64, 4 heads, RoPE axes 4/6/6) is built through ComfyUI's own Flux classes by the pack's
loader (ComfyUI's detection alone would assume FLUX's 24 heads); the tiny VAE is a real ``comfy.sd.VAE``
(see tests/comfy_support). Everything runs in float32 on CPU, where ComfyUI computes in float32.

Tolerance: the fixtures' float32 atol 1e-5 (unit normals 5e-5), the same as the engine's own parity tests; the two
paths differ in summation order only (ComfyUI adds guidance before the pooled text, RMSNorm and RoPE are its own),
measured max 2.5e-6. bf16 is not compared: ComfyUI manual-casts bf16 weights to float32 on CPU.
"""

import json
import shutil

import pytest
import torch
from comfy_support import load_pack, tiny_flux_vae
from safetensors.torch import load_file

from conftest import FIXTURES, MANIFEST, TINY_DIT_CONFIG, load_run
from e2p_core.backends.diffusers_backend import load_diffusers_backend
from e2p_core.images import load_image_rgb
from e2p_core.pipeline import perceive as perceive_diffusers
from e2p_core.prompts import load_prompt_embeddings
from e2p_core.weights import load_dit, load_vae

pack = load_pack()
from e2p_pack.e2p_core.pipeline import perceive  # noqa: E402  (the pack's copy, as ComfyUI runs it)
from e2p_pack.e2p_core.prompts import load_prompt_embeddings as load_pack_prompt  # noqa: E402
from e2p_pack.nodes.comfy_backend import ComfyCodec, ComfyDenoiser  # noqa: E402
from e2p_pack.nodes.loader import load_e2p_model  # noqa: E402

FP32_RUNS = sorted(name for name, info in MANIFEST["runs"].items() if info["dtype"] == "float32")
ATOL = 1e-5
NORMAL_OUTPUT_ATOL = 5e-5


@pytest.fixture(scope="module")
def dit_files(tmp_path_factory) -> dict[str, object]:
    """Both fixture copies of the DiT, each with the ``<name>.json`` giving the tiny RoPE axes."""
    folder = tmp_path_factory.mktemp("dit")
    files = {}
    for name in ("dit_bfl", "dit_diffsynth"):
        files[name] = shutil.copy(FIXTURES / f"{name}.safetensors", folder)
        (folder / f"{name}.json").write_text(json.dumps(TINY_DIT_CONFIG))
    return files


@pytest.fixture(scope="module")
def comfy_vae():
    return tiny_flux_vae(load_file(FIXTURES / "vae_bfl.safetensors"))


def comfy_backend(dit_file, vae, lora: bool, time_embedding: str = "reference"):
    lora_path = FIXTURES / "lora_kohya.safetensors" if lora else None
    denoiser = ComfyDenoiser(load_e2p_model(dit_file, lora_path=lora_path), time_embedding)
    return denoiser, ComfyCodec(vae, denoiser.dtype, denoiser.device)


def settings_of(name: str) -> dict:
    info = MANIFEST["runs"][name]
    square = "square" in name
    return {"task": info["task"], "steps": info["steps"], "lora": info["lora"],
            "resize": "reference" if square else "aligned",
            "resolution": int(name.rsplit("square", 1)[1]) if square else "native"}


def run_comfy(name, dit_file, vae, inputs_npz, prompt_files):
    settings = settings_of(name)
    denoiser, codec = comfy_backend(dit_file, vae, settings["lora"])
    prompt = load_pack_prompt(prompt_files[settings["task"]]).to("cpu", torch.float32)
    point_map = inputs_npz["point_mask"] if settings["task"] == "matting" else None
    return perceive(denoiser, codec, load_image_rgb(FIXTURES / "input.png"), settings["task"], prompt,
                    point_map=point_map, steps=settings["steps"], noise=load_run(name)["noise"].float(),
                    resize=settings["resize"], resolution=settings["resolution"])


# Every float32 run from the BFL copy; the DiffSynth copy once (test_nodes_loader checks the conversion itself).
OFFICIAL_CASES = [(name, "dit_bfl") for name in FP32_RUNS] + [("depth_1step_fp32", "dit_diffsynth")]


@pytest.mark.parametrize(("name", "dit_name"), OFFICIAL_CASES)
def test_native_path_matches_official_run(name, dit_name, dit_files, comfy_vae, inputs_npz, prompt_files):
    run = load_run(name)
    task = settings_of(name)["task"]
    result = run_comfy(name, dit_files[dit_name], comfy_vae, inputs_npz, prompt_files)
    torch.testing.assert_close(result.velocity, run["velocity_first_step"], atol=ATOL, rtol=0)
    torch.testing.assert_close(result.latent, run["final_latent"], atol=ATOL, rtol=0)
    torch.testing.assert_close(result.decoded, run["decoded_raw"], atol=ATOL, rtol=0)
    post = run["post_np"].permute(2, 0, 1)[None]
    expected = post if task == "normal" else post.mean(dim=1, keepdim=True)
    torch.testing.assert_close(result.postprocessed, expected, atol=NORMAL_OUTPUT_ATOL if task == "normal" else ATOL,
                               rtol=0)


@pytest.mark.parametrize("name", ["depth_1step_lora_fp32", "matting_1step_fp32"])
def test_native_path_matches_diffusers_path(name, dit_files, comfy_vae, inputs_npz, prompt_files):
    """Same weights, same inputs, seeded noise (not the fixture's): the two backends agree stage by stage."""
    settings = settings_of(name)
    loras = [(FIXTURES / "lora_kohya.safetensors", 1.0)] if settings["lora"] else []
    dit = load_dit(FIXTURES / "dit_bfl.safetensors", TINY_DIT_CONFIG, loras)
    denoiser, codec = load_diffusers_backend(dit, load_vae(FIXTURES / "vae_bfl.safetensors"), torch.float32, "cpu",
                                             time_embedding="reference")  # as comfy_backend's
    image = load_image_rgb(FIXTURES / "input.png")
    point_map = inputs_npz["point_mask"] if settings["task"] == "matting" else None
    expected = perceive_diffusers(denoiser, codec, image, settings["task"],
                                  load_prompt_embeddings(prompt_files[settings["task"]]), point_map=point_map,
                                  resolution=64)
    comfy_denoiser, comfy_codec = comfy_backend(dit_files["dit_bfl"], comfy_vae, settings["lora"])
    result = perceive(comfy_denoiser, comfy_codec, image, settings["task"],
                      load_pack_prompt(prompt_files[settings["task"]]), point_map=point_map, resolution=64)
    for stage in ("velocity", "latent", "decoded"):
        torch.testing.assert_close(getattr(result, stage), getattr(expected, stage), atol=ATOL, rtol=0)
    atol = NORMAL_OUTPUT_ATOL if settings["task"] == "normal" else ATOL
    torch.testing.assert_close(result.output, expected.output, atol=atol, rtol=0)
    assert result.output.shape[-2:] == image.shape[:2]


def test_time_embedding_variants_reach_the_dit(dit_files, comfy_vae, prompt_files):
    """The pre-hook feeds e2p_core's sinusoid: 'bf16' rounding in float32 compute equals the diffusers backend's
    'bf16' variant and differs from 'exact'; the hook is gone after the call."""
    image = load_image_rgb(FIXTURES / "input.png")
    dit = load_dit(FIXTURES / "dit_bfl.safetensors", TINY_DIT_CONFIG)
    vae = load_vae(FIXTURES / "vae_bfl.safetensors")
    velocities = {}
    for variant in ("bf16", "exact"):
        denoiser, codec = comfy_backend(dit_files["dit_bfl"], comfy_vae, lora=False, time_embedding=variant)
        result = perceive(denoiser, codec, image, "depth", load_pack_prompt(prompt_files["depth"]), resolution=64)
        assert not denoiser.model.model.diffusion_model.time_in._forward_pre_hooks
        reference_denoiser, reference_codec = load_diffusers_backend(dit, vae, torch.float32, "cpu", variant)
        expected = perceive_diffusers(reference_denoiser, reference_codec, image, "depth",
                                      load_prompt_embeddings(prompt_files["depth"]), resolution=64)
        torch.testing.assert_close(result.velocity, expected.velocity, atol=ATOL, rtol=0)
        velocities[variant] = result.velocity
    assert (velocities["bf16"] - velocities["exact"]).abs().max() > 100 * ATOL


def test_fp8_weights_run_through_the_same_path(tmp_path, dit_files, comfy_vae, prompt_files):
    """fp8 storage (manual-cast to float32 on CPU) gives a close, not equal, prediction: the rounding of the weights
    to 3 mantissa bits is the only difference."""
    image = load_image_rgb(FIXTURES / "input.png")
    prompt = load_pack_prompt(prompt_files["depth"])
    outputs = {}
    for weight_dtype in ("default", "fp8_e4m3fn"):
        denoiser = ComfyDenoiser(load_e2p_model(dit_files["dit_bfl"], weight_dtype))
        codec = ComfyCodec(comfy_vae, denoiser.dtype, denoiser.device)
        outputs[weight_dtype] = perceive(denoiser, codec, image, "depth", prompt, resolution=64).velocity
    difference = outputs["fp8_e4m3fn"] - outputs["default"]
    assert 0 < difference.norm() < 0.2 * outputs["default"].norm()
