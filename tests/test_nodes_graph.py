"""Node-level behaviour with real ComfyUI modules on CPU: schemas, task conditioning and its CLIP cache, point prompts,
perceive (sizes, batch order, chunking, progress, cancel), output layouts and conventions, all-in-one nodes, errors.

The model is the tiny fixture DiT through the pack's loader, the VAE and the FLUX CLIP are real ComfyUI objects of tiny
size (tests/comfy_support). Expected values are computed by hand or by running the pieces separately.
"""

import logging
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from comfy_support import REPO, load_pack, tiny_e2p_model, tiny_flux_clip, tiny_flux_vae, use_model_folders
from safetensors.torch import load_file

from conftest import FIXTURES

pack = load_pack()
import comfy.model_management  # noqa: E402
import comfy.utils  # noqa: E402
from e2p_pack.e2p_core.errors import CheckpointError, InputError  # noqa: E402
from e2p_pack.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402
from e2p_pack.nodes.conditioning import E2PTaskConditioning  # noqa: E402
from e2p_pack.nodes.outputs import E2PDepthOutput, E2PMatteOutput, E2PNormalOutput  # noqa: E402
from e2p_pack.nodes.perceive import E2PPerceive, run_perceive  # noqa: E402
from e2p_pack.nodes.point_prompt import E2PPointPrompt  # noqa: E402
from e2p_pack.nodes.prediction import Prediction  # noqa: E402

RESOLUTION = 64  # small processing size: the tiny model at 768 px would only make the tests slow


@pytest.fixture
def folders(tmp_path, prompt_files):
    folders = use_model_folders(tmp_path)
    for task, path in prompt_files.items():
        shutil.copy(path, folders["e2p_prompts"] / f"{task}.safetensors")
    return folders


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_e2p_model(tmp_path_factory.mktemp("dit"))


@pytest.fixture(scope="module")
def vae():
    return tiny_flux_vae(load_file(FIXTURES / "vae_bfl.safetensors"))


def frames(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, height, width, 3, generator=torch.Generator().manual_seed(seed))


def conditioning(task: str) -> list:
    return E2PTaskConditioning().encode(task, "auto")[0]


# ------------------------------------------------------------------------------------------------------- schemas


def test_every_node_is_documented():
    assert NODE_CLASS_MAPPINGS.keys() == NODE_DISPLAY_NAME_MAPPINGS.keys()
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        assert node_id.startswith("E2P") and cls.CATEGORY.startswith("Edit2Perceive")
        assert len(cls.DESCRIPTION) > 40 and callable(getattr(cls(), cls.FUNCTION))
        assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS)
        schema = cls.INPUT_TYPES()
        for group in ("required", "optional"):
            for name, spec in schema.get(group, {}).items():
                assert len(spec) == 2 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"


def test_node_import_path_does_not_need_diffusers():
    """Loading the pack as ComfyUI does must work with diffusers absent (ComfyUI itself imports transformers)."""
    code = ("import sys; sys.modules['diffusers'] = None; sys.path[:0] = [sys.argv[1]]\n"
            "from comfy_support import load_pack; load_pack()\n"
            "assert not [m for m in sys.modules if 'diffusers_backend' in m], 'diffusers backend imported'\n"
            "print(len(sys.modules['e2p_pack'].NODE_CLASS_MAPPINGS))")
    done = subprocess.run([sys.executable, "-c", code, str(REPO / "tests")], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == str(len(NODE_CLASS_MAPPINGS))


# -------------------------------------------------------------------------------------------------- conditioning


def test_task_conditioning_from_file(folders, prompt_files):
    (cond,) = E2PTaskConditioning().encode("normal", "auto")
    stored = load_file(prompt_files["normal"])
    assert len(cond) == 1 and torch.equal(cond[0][0], stored["prompt_embeds"])
    assert torch.equal(cond[0][1]["pooled_output"], stored["pooled_prompt_embeds"])
    assert cond[0][1]["e2p_task"] == "normal" and cond[0][1]["guidance"] == 1.0
    (by_name,) = E2PTaskConditioning().encode("normal", "depth.safetensors")
    assert torch.equal(by_name[0][0], load_file(prompt_files["depth"])["prompt_embeds"])
    (folders["e2p_prompts"] / "depth.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"'depth\.safetensors' not found in .*e2p_prompts.*embed-prompts"):
        E2PTaskConditioning().encode("normal", "depth.safetensors")  # ('auto' encodes a missing file: see
        # test_nodes_prompt_download.py)


def test_clip_runs_once_per_prompt_and_the_cache_is_read_after(folders):
    clip = tiny_flux_clip()
    graph = {"1": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors",
                                                              "clip_name2": "t5xxl.safetensors", "type": "flux"}},
             "2": {"class_type": "E2PTaskConditioning", "inputs": {"task": "depth", "clip": ["1", 0]}}}
    node = E2PTaskConditioning()
    assert node.check_lazy_status("depth", "auto", graph=graph, node_id="2") == ["clip"]
    (first,) = node.encode("depth", "auto", clip=clip, graph=graph, node_id="2")
    assert first[0][0].shape == (1, 512, 32) and first[0][1]["pooled_output"].shape == (1, 32)  # T5 padded to 512
    assert len(list((folders["e2p_prompts"] / "clip_cache").glob("*.safetensors"))) == 1
    # Cached: ComfyUI is told not to evaluate the CLIP branch, and the node works without it.
    assert node.check_lazy_status("depth", "auto", graph=graph, node_id="2") == []
    (second,) = node.encode("depth", "auto", clip=None, graph=graph, node_id="2")
    assert torch.equal(second[0][0], first[0][0]) and torch.equal(second[0][1]["pooled_output"],
                                                                  first[0][1]["pooled_output"])
    assert "clip_cache/" not in " ".join(E2PTaskConditioning.INPUT_TYPES()["required"]["embeddings"][0])
    # Another prompt, or another text encoder file, is another cache entry.
    assert node.check_lazy_status("depth", "auto", prompt_override="x", graph=graph, node_id="2") == ["clip"]
    graph["1"]["inputs"]["clip_name2"] = "t5xxl_fp8.safetensors"
    assert node.check_lazy_status("depth", "auto", graph=graph, node_id="2") == ["clip"]
    # An unlinked CLIP input is never requested.
    assert node.check_lazy_status("depth", "auto", graph={"2": {"inputs": {}}}, node_id="2") == []


# -------------------------------------------------------------------------------------------------- point prompt


def test_point_prompt_reads_pixels_and_normalized_alike(caplog):
    image = frames(1, 48, 64)
    by_pixels, preview = E2PPointPrompt().build(image, '[{"x": 32, "y": 24}]', "auto", "clicks")
    by_fraction, preview_normalized = E2PPointPrompt().build(image, "[[0.5, 0.5]]", "normalized", "clicks")
    assert np.array_equal(by_pixels.prompt.points_px, [[32.0, 24.0]])
    assert np.array_equal(by_fraction.prompt.points_px, [[32.0, 24.0]]) and by_pixels.image_hw == (48, 64)
    assert preview.shape == (1, 48, 64) and torch.equal(preview, preview_normalized)
    assert divmod(int(preview.argmax()), 64) == (24, 32) and preview.max() == 1 and preview.min() >= 0
    with caplog.at_level(logging.WARNING):
        _, app_preview = E2PPointPrompt().build(image, '[{"x": 10, "y": 12}]', "pixels", "app",
                                                negative_coords='[{"x": 50, "y": 40}]')
    assert "1 negative point(s) ignored" in caplog.text
    # Points are sampled in the click's disk (radius 100 px at 768 -> 8.3 px here), their Gaussians (sigma 30 px at
    # 768 -> 2.5 px) reach 10 px: nothing lies beyond 8.3 + 10 px of the click along either axis.
    assert app_preview.max() == 1 and app_preview[0, :, 10 + 19:].max() == 0 and app_preview[0, 12 + 19:].max() == 0


def test_point_prompt_from_mask_and_errors():
    image = frames(1, 48, 64)
    mask = torch.zeros(1, 48, 64)
    mask[0, 10:30, 20:50] = 1
    prompt, preview = E2PPointPrompt().build(image, "[]", "auto", "app", mask=mask)
    assert prompt.prompt.mode == "mask" and preview[0][mask[0] == 0].max() < 1
    with pytest.raises(InputError, match="not valid JSON"):
        E2PPointPrompt().build(image, '[{"x": 1, ', "auto", "app")
    with pytest.raises(InputError, match="outside the 64x48 image"):
        E2PPointPrompt().build(image, '[{"x": 100, "y": 10}]', "pixels", "app")
    with pytest.raises(InputError, match="mask has shape"):
        E2PPointPrompt().build(image, "[]", "auto", "app", mask=torch.ones(1, 10, 10))


def test_point_strings_are_validated_before_the_run():
    """VALIDATE_INPUTS turns a typo into a ComfyUI node error before anything runs; linked strings (None) pass."""
    for node in (E2PPointPrompt, NODE_CLASS_MAPPINGS["E2PMattingAllInOne"]):
        assert node.VALIDATE_INPUTS(positive_coords='[{"x": 1, "y": 2}]', negative_coords="") is True
        assert node.VALIDATE_INPUTS() is True
        message = node.VALIDATE_INPUTS(positive_coords="[[1, 2]]", negative_coords='[{"x": 1}]')
        assert message.startswith("negative_coords: point {\"x\": 1} lacks an 'x' or 'y' key")


# -------------------------------------------------------------------------------------------------------- perceive


@pytest.mark.parametrize("height, width", [(37, 53), (50, 29)])
def test_perceive_keeps_exact_size_and_batch_order(height, width, model, vae, folders):
    images = frames(3, height, width)
    progress = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: progress.append(value))
    try:
        batch = run_perceive(model, vae, conditioning("depth"), images, resolution=RESOLUTION, chunk_size=2)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert batch.output.shape == (3, 1, height, width) and batch.output.dtype == torch.float32
    assert progress[-1] == 2  # two chunks of one step
    for index in (1, 2):  # frame 1 shared a chunk with frame 0; frame 2 was alone in the second chunk
        alone = run_perceive(model, vae, conditioning("depth"), images[index:index + 1], resolution=RESOLUTION)
        torch.testing.assert_close(batch.output[index], alone.output[0], atol=1e-6, rtol=0)
    assert not torch.equal(batch.output[0], batch.output[1])


def test_matting_through_the_nodes_uses_the_point_prompt(model, vae, folders):
    image = frames(1, 40, 56)
    point_prompt, preview = E2PPointPrompt().build(image, '[{"x": 20, "y": 16}]', "pixels", "app")
    node = E2PPerceive()
    settings = dict(steps=1, seed=42, resize_mode="aligned", resolution=RESOLUTION, chunk_size=4,
                    time_embedding="auto")
    (with_points,) = node.perceive(model, vae, conditioning("matting"), image, **settings, point_prompt=point_prompt)
    (without,) = node.perceive(model, vae, conditioning("matting"), image, **settings)
    assert with_points.task == "matting" and with_points.output.shape == (1, 1, 40, 56)
    assert not torch.allclose(with_points.output, without.output)
    alpha, foreground, rgba = E2PMatteOutput().convert(with_points)
    assert alpha.shape == (1, 40, 56) and rgba.shape == (1, 40, 56, 4)
    with pytest.raises(InputError, match="point prompt was made on a 56x40 image.*28x20"):
        node.perceive(model, vae, conditioning("matting"), frames(1, 20, 28), **settings, point_prompt=point_prompt)


def test_cancel_stops_the_run(model, vae, folders):
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            run_perceive(model, vae, conditioning("depth"), frames(2, 32, 32), resolution=RESOLUTION, chunk_size=1)
    finally:
        comfy.model_management.interrupt_current_processing(False)


def test_perceive_errors(model, vae, folders):
    cond = conditioning("depth")
    with pytest.raises(InputError, match="does not say which Edit2Perceive task"):
        run_perceive(model, vae, [[cond[0][0], {"pooled_output": cond[0][1]["pooled_output"]}]], frames(1, 32, 32))
    with pytest.raises(InputError, match="MODEL is a AutoencoderKL, not a FLUX.1"):
        run_perceive(vae.patcher, vae, cond, frames(1, 32, 32))
    with pytest.raises(InputError, match=r"IMAGE \[B,H,W,3\]"):
        run_perceive(model, vae, cond, torch.rand(32, 32, 3))
    with pytest.raises(InputError, match="resolution is 40"):
        run_perceive(model, vae, cond, frames(1, 32, 32), resolution=40)


# ---------------------------------------------------------------------------------------------------------- outputs


def prediction(task: str, output: torch.Tensor, images: torch.Tensor | None = None) -> Prediction:
    batch, _, height, width = output.shape
    return Prediction(task, output, frames(batch, height, width) if images is None else images)


def test_depth_output_layouts_and_polarity():
    depth = torch.linspace(0.2, 0.6, 2 * 5 * 7).reshape(2, 1, 5, 7)  # near = 0 (small = near)
    hint, raw, preview = E2PDepthOutput().convert(prediction("depth", depth), "near_white", "none")
    assert hint.shape == (2, 5, 7, 3) and raw.shape == (2, 5, 7) and preview.shape == (2, 5, 7, 3)
    assert torch.equal(hint[..., 0], hint[..., 2]) and torch.allclose(hint[..., 1], 1 - depth[:, 0])
    assert torch.equal(raw, depth[:, 0]) and preview.min() >= 0 and preview.max() <= 1
    assert preview[0, 0, 0, 0] > preview[0, 0, 0, 2]  # the nearest pixel is red in the preview
    near_black, sequence, _ = E2PDepthOutput().convert(prediction("depth", depth), "near_black", "sequence")
    assert torch.allclose(sequence, (depth[:, 0] - 0.2) / 0.4) and sequence.min() == 0 and sequence.max() == 1
    assert torch.allclose(near_black[..., 0], sequence)
    with pytest.raises(InputError, match="takes a depth prediction, but the prediction is normal"):
        E2PDepthOutput().convert(prediction("normal", torch.zeros(1, 3, 2, 2)), "near_white", "none")


def test_normal_output_conventions():
    normals = torch.nn.functional.normalize(torch.tensor([0.6, -0.3, 0.74]), dim=0).view(1, 3, 1, 1).expand(1, 3, 2, 3)
    n_x, n_y, n_z = (float(v) for v in normals[0, :, 0, 0])
    expected = {"controlnet_bae": (n_x, n_y, n_z), "opengl": (-n_x, n_y, n_z), "directx": (-n_x, -n_y, n_z)}
    for convention, axes in expected.items():
        (image,) = E2PNormalOutput().convert(prediction("normal", normals), convention)
        assert image.shape == (1, 2, 3, 3)
        torch.testing.assert_close(image[0, 1, 2], (torch.tensor(axes) + 1) / 2)


def test_matte_output_layouts():
    alpha = torch.rand(2, 1, 4, 6, generator=torch.Generator().manual_seed(1))
    images = frames(2, 4, 6, seed=2)
    mask, foreground, rgba = E2PMatteOutput().convert(prediction("matting", alpha, images))
    assert mask.shape == (2, 4, 6) and torch.equal(mask, alpha[:, 0])
    assert torch.allclose(foreground, images * alpha[:, 0, :, :, None])
    assert rgba.shape == (2, 4, 6, 4) and torch.equal(rgba[..., :3], images) and torch.equal(rgba[..., 3], mask)


# ------------------------------------------------------------------------------------------------------ all-in-one


def test_all_in_one_equals_the_separate_nodes(model, vae, folders):
    image = frames(2, 30, 44)
    aio = NODE_CLASS_MAPPINGS["E2PDepthAllInOne"]()
    assert aio.check_lazy_status(model, vae, image, "auto", RESOLUTION, "near_white", "none") == []
    together = aio.run(model, vae, image, "auto", RESOLUTION, "near_white", "percentile")
    (cond,) = E2PTaskConditioning().encode("depth", "auto")
    (pred,) = E2PPerceive().perceive(model, vae, cond, image, 1, 42, "aligned", RESOLUTION, 4, "auto")
    separate = E2PDepthOutput().convert(pred, "near_white", "percentile")
    for a, b in zip(together, separate, strict=True):
        assert torch.equal(a, b)


def test_matting_all_in_one_equals_the_separate_nodes(model, vae, folders, caplog):
    image = frames(1, 36, 52)
    clicks, negatives = '[{"x": 0.25, "y": 0.5}]', '[{"x": 0.8, "y": 0.2}]'
    together = NODE_CLASS_MAPPINGS["E2PMattingAllInOne"]().run(model, vae, image, "auto", RESOLUTION, clicks, "auto",
                                                               negative_coords=negatives)
    (point_prompt, _) = E2PPointPrompt().build(image, clicks, "auto", "app", negative_coords=negatives)
    (cond,) = E2PTaskConditioning().encode("matting", "auto")
    (pred,) = E2PPerceive().perceive(model, vae, cond, image, 1, 42, "aligned", RESOLUTION, 4, "auto",
                                     point_prompt=point_prompt)
    for a, b in zip(together, E2PMatteOutput().convert(pred), strict=True):
        assert torch.equal(a, b)
    assert caplog.text.count("negative point(s) ignored") == 2
