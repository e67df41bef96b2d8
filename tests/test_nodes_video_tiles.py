"""The video and high-resolution features through the nodes: the depth output's 'temporal' normalisation and the
perceive node's tiles (real ComfyUI modules, tiny fixture DiT, tiny Flux VAE)."""

import shutil

import pytest
import torch
from comfy_support import load_pack, tiny_e2p_model, tiny_flux_vae, use_model_folders
from safetensors.torch import load_file

from conftest import FIXTURES

pack = load_pack()
import comfy.utils  # noqa: E402
from e2p_pack.e2p_core.errors import InputError  # noqa: E402
from e2p_pack.e2p_core.tiling import plan_tiles  # noqa: E402
from e2p_pack.e2p_core.video import align_depth_video  # noqa: E402
from e2p_pack.nodes import outputs as outputs_module  # noqa: E402
from e2p_pack.nodes.conditioning import E2PTaskConditioning  # noqa: E402
from e2p_pack.nodes.outputs import E2PDepthOutput  # noqa: E402
from e2p_pack.nodes.perceive import run_perceive  # noqa: E402
from e2p_pack.nodes.prediction import Prediction  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_e2p_model(tmp_path_factory.mktemp("dit"))


@pytest.fixture
def conditioning(tmp_path, prompt_files):
    folders = use_model_folders(tmp_path)
    shutil.copy(prompt_files["depth"], folders["e2p_prompts"] / "depth.safetensors")
    return E2PTaskConditioning().encode("depth", "auto")[0]


def test_temporal_normalisation_removes_per_frame_scale_and_shift(monkeypatch):
    base = torch.linspace(0.1, 0.9, 16 * 24).reshape(1, 1, 16, 24)
    scales = torch.tensor([1.0, 0.7, 0.9, 0.6]).view(-1, 1, 1, 1)
    shifts = torch.tensor([0.0, 0.1, -0.05, 0.2]).view(-1, 1, 1, 1)
    flickering = (base - 0.5) * scales + 0.5 + shifts
    frames = torch.rand(1, 16, 24, 3, generator=torch.Generator().manual_seed(0)).expand(4, -1, -1, -1)  # still
    aligned_with = []  # the frames the alignment matches by optical flow: the ones the depth was predicted from

    def recording(depth, mode, images=None):
        aligned_with.append(images)
        return align_depth_video(depth, mode, images=images)

    monkeypatch.setattr(outputs_module, "align_depth_video", recording)
    _, depth, _ = E2PDepthOutput().convert(Prediction("depth", flickering, frames), "near_white", "temporal")
    assert len(aligned_with) == 1 and aligned_with[0] is frames
    torch.testing.assert_close(depth, align_depth_video(flickering, images=frames)[:, 0])
    # every frame now shows the first one's depth, up to the re-anchoring's Gaussian weights, which differ a little
    # from frame to frame (each frame is anchored to the frames around it)
    for frame in depth[1:]:
        torch.testing.assert_close(frame, depth[0], atol=1e-3, rtol=0)


def test_perceive_with_tiles_returns_exact_size_and_counts_dit_calls(model, conditioning):
    vae = tiny_flux_vae(load_file(FIXTURES / "vae_bfl.safetensors"))
    images = torch.rand(2, 75, 131, 3, generator=torch.Generator().manual_seed(0))
    progress = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: progress.append(total))
    try:
        tiled = run_perceive(model, vae, conditioning, images, resolution=64, tiles=3)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert tiled.output.shape == (2, 1, 75, 131)
    assert progress[-1] == 2 * (1 + len(plan_tiles((75, 131), 3)))  # DiT calls: frames x (global + tiles)
    plain = run_perceive(model, vae, conditioning, images, resolution=64)
    assert not torch.allclose(tiled.output, plain.output)
    with pytest.raises(InputError, match="tiles need a processing resolution"):
        run_perceive(model, vae, conditioning, images, resolution=0, tiles=2)


def test_one_encode_node_feeds_three_perceive_nodes(model, tmp_path, prompt_files):
    """depth, normals and matting of the same frames from one 'Encode Image': the ComfyUI VAE's encoder runs once
    per frame for the RGB (plus matting's own point-map context), and each result equals the unshared run."""
    from e2p_pack.nodes.encode import E2PEncodeImage
    from e2p_pack.nodes.perceive import E2PPerceive

    folders = use_model_folders(tmp_path)
    for task, path in prompt_files.items():
        shutil.copy(path, folders["e2p_prompts"] / f"{task}.safetensors")
    vae = tiny_flux_vae(load_file(FIXTURES / "vae_bfl.safetensors"))
    encoder_frames = []
    encoder = vae.first_stage_model.encode
    vae.first_stage_model.encode = lambda pixels: encoder_frames.append(pixels.shape[0]) or encoder(pixels)
    images = torch.rand(2, 40, 56, 3, generator=torch.Generator().manual_seed(3))
    point_map = torch.zeros(1, 40, 56)
    (encoded,) = E2PEncodeImage().encode(vae, images, "aligned", 64)
    shared = {}
    for task in ("depth", "normal", "matting"):
        conditioning = E2PTaskConditioning().encode(task, "auto")[0]
        (shared[task],) = E2PPerceive().perceive(model, vae, conditioning, images, 1, 42, "aligned", 64, 4, "auto",
                                                 point_map=point_map if task == "matting" else None,
                                                 encoded_image=encoded)
    assert sum(encoder_frames) == 2 + 2  # the RGB once for all three tasks, matting's point map once
    for task in ("depth", "normal", "matting"):
        conditioning = E2PTaskConditioning().encode(task, "auto")[0]
        alone = run_perceive(model, vae, conditioning, images, resolution=64,
                             point_map=point_map if task == "matting" else None)
        torch.testing.assert_close(shared[task].output, alone.output, atol=1e-6, rtol=0)
    with pytest.raises(InputError, match="encoded_image holds 2 frames"):
        run_perceive(model, vae, conditioning, images[:1], resolution=64, encoded_image=encoded)


def test_all_in_one_nodes_take_the_shared_encode(model, tmp_path, prompt_files):
    from e2p_pack.nodes.all_in_one import E2PDepthAllInOne, E2PNormalAllInOne
    from e2p_pack.nodes.encode import E2PEncodeImage

    folders = use_model_folders(tmp_path)
    for task, path in prompt_files.items():
        shutil.copy(path, folders["e2p_prompts"] / f"{task}.safetensors")
    vae = tiny_flux_vae(load_file(FIXTURES / "vae_bfl.safetensors"))
    images = torch.rand(1, 40, 56, 3, generator=torch.Generator().manual_seed(4))
    (encoded,) = E2PEncodeImage().encode(vae, images, "aligned", 64)
    encoder_frames = []
    encoder = vae.first_stage_model.encode
    vae.first_stage_model.encode = lambda pixels: encoder_frames.append(pixels.shape[0]) or encoder(pixels)
    shared_depth = E2PDepthAllInOne().run(model, vae, images, "auto", 64, "near_white", "none", encoded_image=encoded)
    shared_normal = E2PNormalAllInOne().run(model, vae, images, "auto", 64, "controlnet_bae", encoded_image=encoded)
    assert encoder_frames == []  # both reused the encode
    own_depth = E2PDepthAllInOne().run(model, vae, images, "auto", 64, "near_white", "none")
    own_normal = E2PNormalAllInOne().run(model, vae, images, "auto", 64, "controlnet_bae")
    assert encoder_frames == [1, 1]
    torch.testing.assert_close(shared_depth[1], own_depth[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(shared_normal[0], own_normal[0], atol=1e-6, rtol=0)
