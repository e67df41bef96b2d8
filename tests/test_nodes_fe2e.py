"""The FE2E nodes (nodes/fe2e.py) against the engine path, on a 3072-wide FE2E test DiT that ComfyUI's own Flux
detection loads (one double + one single block, no guidance embedder, a one-block connector; tests/e2e/models.py).

Loader -> conditioning -> perceive run as ComfyUI would call them, with the files in ComfyUI's model folders and the
LoRA applied as patches; the engine path is ``load_step1x`` (LoRA merged) on the diffusers Flux transformer. The DiT
is written in float32 here so that ComfyUI keeps the patched weights in float32 as the engine does (a bf16 file would
store the merged LoRA rounded to bf16). float32 on CPU: the paths differ in summation order only (atol 1e-5; unit
normals 1e-4 as the fixture README's).
"""

import gc
import shutil

import numpy as np
import pytest
import torch
from comfy_support import load_pack, use_model_folders
from e2e.models import write_test_fe2e_dit, write_test_fe2e_lora, write_test_prompt_cache
from e2e.pictures import scene

from e2p_core.backends.step1x_backend import load_step1x_backend
from e2p_core.connector import load_prompt_cache
from e2p_core.fe2e import perceive_fe2e
from e2p_core.weights import load_step1x, load_vae
from fe2e_support import FP32_NORMAL_UNIT_ATOL, VAE, VAE_CONFIG
from test_fe2e_errors import E2P_LORA
from test_nodes_fe2e_backend import tiny_fe2e_vae

pack = load_pack()
from e2p_pack.e2p_core.errors import CheckpointError, InputError  # noqa: E402
from e2p_pack.nodes import NODE_CLASS_MAPPINGS  # noqa: E402
from e2p_pack.nodes.comfy_backend import ComfyDenoiser  # noqa: E402
from e2p_pack.nodes.fe2e import FE2EConditioning, FE2EModelLoader, FE2EPerceive  # noqa: E402
from e2p_pack.nodes.outputs import E2PDepthOutput, E2PNormalOutput  # noqa: E402

ATOL = 1e-5
DIT_NAME = "step1x-edit-test.safetensors"
LORA_NAME = "fe2e-test-lora.safetensors"
IMAGE_WH = (83, 61)  # odd on purpose: the outputs must come back at exactly this size
SEED = 1234
RESOLUTION = 64  # longer side: 64x48 processing, 8x6 latent tokens per half


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    folders = use_model_folders(tmp_path_factory.mktemp("models"))
    write_test_fe2e_dit(folders["diffusion_models"] / DIT_NAME, torch.float32)
    write_test_fe2e_lora(folders["loras"] / LORA_NAME)
    write_test_prompt_cache(folders["e2p_prompts"] / "no_info.npz")
    return folders


def engine_outputs(folders, image: np.ndarray, steps: int):
    weights = load_step1x(folders["diffusion_models"] / DIT_NAME, None, [(folders["loras"] / LORA_NAME, 1.0)],
                          torch.float32)
    denoiser, codec = load_step1x_backend(weights, load_vae(VAE, VAE_CONFIG), torch.float32, "cpu")
    del weights
    result = perceive_fe2e(denoiser, codec, image, load_prompt_cache(folders["e2p_prompts"] / "no_info.npz"),
                           steps=steps, seed=SEED, resize="aligned", resolution=RESOLUTION, cfg_rows=1)
    return result.depth, result.normal


def node_outputs(image: np.ndarray, steps: int, frames: int = 1, chunk_size: int = 4):
    model, connector = FE2EModelLoader().load(DIT_NAME, "default", LORA_NAME, 1.0)
    (conditioning,) = FE2EConditioning().encode(connector, "no_info.npz")
    pixels = torch.from_numpy(image).float().div(255)[None].repeat(frames, 1, 1, 1)  # IMAGE [B,H,W,3]
    return FE2EPerceive().perceive(model, tiny_fe2e_vae(), conditioning, pixels, steps, SEED, "longer_side",
                                   RESOLUTION, "aligned", chunk_size)


@pytest.mark.parametrize("steps", [1, 2])
def test_fe2e_nodes_equal_the_engine_path(folders, steps):
    image = scene(*IMAGE_WH)  # uint8 [61,83,3]
    expected_depth, expected_normal = engine_outputs(folders, image, steps)
    gc.collect()
    frames = 2 if steps == 2 else 1  # two frames in chunks of one: every frame gets the same noise
    depth, normal = node_outputs(image, steps, frames=frames, chunk_size=1)
    assert depth.task == "depth" and normal.task == "normal"
    height, width = IMAGE_WH[1], IMAGE_WH[0]
    assert depth.output.shape == (frames, 1, height, width) and normal.output.shape == (frames, 3, height, width)
    for frame in range(frames):
        torch.testing.assert_close(depth.output[frame:frame + 1], expected_depth, atol=ATOL, rtol=0)
        torch.testing.assert_close(normal.output[frame:frame + 1], expected_normal, atol=FP32_NORMAL_UNIT_ATOL,
                                   rtol=0)
    assert expected_depth.std() > 1e-3  # a real map, not a constant

    # The existing output nodes take both predictions unchanged.
    hint, depth_mask, preview = E2PDepthOutput().convert(depth, "near_black", "none")
    torch.testing.assert_close(depth_mask, depth.output[:, 0])
    assert hint.shape == preview.shape == (frames, height, width, 3)
    (normal_map,) = E2PNormalOutput().convert(normal, "controlnet_bae")
    assert normal_map.shape == (frames, height, width, 3) and 0 <= normal_map.min() and normal_map.max() <= 1


def test_fe2e_nodes_are_registered():
    """(Tooltips, descriptions and categories of every node: tests/test_nodes_graph.py.)"""
    assert NODE_CLASS_MAPPINGS["E2PFE2EModelLoader"] is FE2EModelLoader
    assert NODE_CLASS_MAPPINGS["E2PFE2EConditioning"] is FE2EConditioning
    assert NODE_CLASS_MAPPINGS["E2PFE2EPerceive"] is FE2EPerceive


def test_pickers_list_each_family_s_files(folders):
    """FE2E's loader offers Step1X-Edit and FE2E's LoRA (as downloads when absent), not FLUX Kontext; the VAE loader
    offers both families' VAEs."""
    from e2p_pack.nodes.loader import E2PModelLoader, E2PVAELoader

    fe2e_inputs = FE2EModelLoader.INPUT_TYPES()["required"]
    models = fe2e_inputs["model_name"][0]
    assert DIT_NAME in models and any(name.startswith("step1x-edit-i1258.safetensors (download") for name in models)
    assert not any(name.startswith("flux1-kontext") for name in models)
    assert fe2e_inputs["lora_name"][1]["default"].startswith("LDRN.safetensors (download")
    assert not any(name.startswith("step1x-edit-i1258") for name in
                   E2PModelLoader.INPUT_TYPES()["required"]["model_name"][0])
    vaes = E2PVAELoader.INPUT_TYPES()["required"]["vae_name"][0]
    assert any(name.startswith("step1x-edit-vae.safetensors") for name in vaes)
    assert any(name.startswith("ae.safetensors") for name in vaes)


def test_an_edit2perceive_dit_is_refused_as_fe2e_and_the_reverse(folders, tmp_path):
    from e2e.models import write_test_dit

    from e2p_pack.nodes.loader import load_e2p_model

    e2p_dit = folders["diffusion_models"] / "flux-kontext-test.safetensors"
    write_test_dit(e2p_dit)
    try:
        with pytest.raises(CheckpointError, match="not a Step1X-Edit"):
            FE2EModelLoader().load(e2p_dit.name, "default", "none", 1.0)
        with pytest.raises(CheckpointError, match="FE2E Model Loader"):
            load_e2p_model(folders["diffusion_models"] / DIT_NAME)
        # A FLUX MODEL from another loader reaching FE2E Perceive: refused before any work.
        _, connector = FE2EModelLoader().load(DIT_NAME, "default", "none", 1.0)
        (conditioning,) = FE2EConditioning().encode(connector, "no_info.npz")
        with pytest.raises(InputError, match="guidance embedder"):
            FE2EPerceive().perceive(load_e2p_model(e2p_dit), tiny_fe2e_vae(), conditioning, torch.rand(1, 32, 32, 3),
                                    1, SEED, "native", 64, "aligned", 4)
        # ... and the FE2E MODEL reaching Edit2Perceive's perceive node.
        fe2e_model, _ = FE2EModelLoader().load(DIT_NAME, "default", "none", 1.0)
        with pytest.raises(InputError, match="belongs to 'FE2E Perceive'"):
            ComfyDenoiser(fe2e_model)
    finally:
        e2p_dit.unlink()


def test_a_lora_of_the_other_family_is_refused(folders):
    from e2p_pack.nodes.loader import load_e2p_model

    shutil.copy(E2P_LORA, folders["loras"] / "e2p-depth.safetensors")
    with pytest.raises(CheckpointError, match="Edit2Perceive"):
        FE2EModelLoader().load(DIT_NAME, "default", "e2p-depth.safetensors", 1.0)
    with pytest.raises(CheckpointError, match="FE2E"):
        load_e2p_model(folders["diffusion_models"] / DIT_NAME, lora_path=folders["loras"] / LORA_NAME)


def test_a_missing_or_malformed_prompt_cache_is_a_clear_error(folders, tmp_path):
    model, connector = FE2EModelLoader().load(DIT_NAME, "default", "none", 1.0)
    with pytest.raises(InputError, match="AMAP-ML/FE2E"):
        FE2EConditioning().encode(connector, "absent.npz")
    bad = tmp_path / "bad.npz"
    np.savez(bad, embeds=np.zeros((4, 64), np.float32))
    with pytest.raises(InputError, match="lacks"):
        FE2EConditioning().encode(connector, "no_info.npz", prompt_cache_path=str(bad))
    wide = tmp_path / "wide.npz"
    np.savez(wide, embeds=np.zeros((4, 3584), np.float32), masks=np.ones(4, np.int64))
    with pytest.raises(InputError, match="3584-wide"):
        FE2EConditioning().encode(connector, "no_info.npz", prompt_cache_path=str(wide))


def test_perceive_refuses_the_wrong_conditioning_or_model(folders):
    model, connector = FE2EModelLoader().load(DIT_NAME, "default", "none", 1.0)
    (conditioning,) = FE2EConditioning().encode(connector, "no_info.npz")
    image = torch.rand(1, 32, 32, 3)
    task_conditioning = [[torch.zeros(1, 4, 64), {"pooled_output": torch.zeros(1, 32), "e2p_task": "depth"}]]
    with pytest.raises(InputError, match="not FE2E's"):
        FE2EPerceive().perceive(model, tiny_fe2e_vae(), task_conditioning, image, 1, SEED, "native", 64, "aligned", 4)
    with pytest.raises(InputError, match="chunk_size"):
        FE2EPerceive().perceive(model, tiny_fe2e_vae(), conditioning, image, 1, SEED, "native", 64, "aligned", 0)
