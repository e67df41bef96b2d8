"""The pack inside a real ComfyUI 0.3.75 server (CPU, 127.0.0.1), driven over its HTTP/WebSocket API.

The server loads the pack from ``custom_nodes/`` like a user's install; the DiT is a 3072-wide Flux with one block
of each kind that ComfyUI's own model detection accepts, the VAE a full-size Flux VAE (random, seeded weights; see
models.py). Expected values are computed here from the saved PNGs, never copied from the pack's code.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .api_prompts import (
    BATCH,
    CONDITIONING,
    FE2E_SAVE,
    IMAGE,
    MODEL,
    PERCEIVE,
    POINTS,
    SAVE,
    VAE,
    fe2e_prompt,
    node,
    perceive_prompt,
)
from .comfy_server import PACK_FOLDER_NAME, ComfyServer, PromptRejected, messages
from .conftest import (
    BACKGROUND_IMAGE,
    BROKEN_EMBEDDINGS,
    ODD_IMAGE,
    ODD_SIZE_WH,
    TEST_DIT,
    TEST_FE2E_DIT,
    TEST_FE2E_LORA,
    TEST_VAE,
)
from .events import FINAL_EVENTS, prompt_events

PACK_NODES = {
    "E2PModelLoader", "E2PTaskConditioning", "E2PPointPrompt", "E2PPerceive", "E2PDepthOutput", "E2PNormalOutput",
    "E2PMatteOutput", "E2PDepthAllInOne", "E2PNormalAllInOne", "E2PMattingAllInOne", "E2PVAELoader", "E2PEncodeImage",
    "E2PFE2EModelLoader", "E2PFE2EConditioning", "E2PFE2EPerceive",
}
SUBJECT_CLICK = {"x": 29, "y": 33}  # on the disk of the test scene (centre 0.35 W, 0.55 H of 83x61)


def _pixels(path: Path, mode: str | None = None) -> np.ndarray:
    """A saved PNG as float values in [0, 1] ([H, W] or [H, W, C])."""
    image = Image.open(path)
    return np.asarray(image.convert(mode) if mode else image, dtype=np.float64) / 255.0


def _run_ok(server: ComfyServer, prompt: dict) -> dict:
    entry = server.run(prompt)
    errors = messages(entry, "execution_error")
    assert entry["status"]["status_str"] == "success", f"execution failed: {errors}"
    return entry


def _saved(server: ComfyServer, entry: dict, node_id: str) -> Path:
    files = server.output_images(entry, node_id)
    assert len(files) == 1 and files[0].is_file(), f"node {node_id} saved {files}"
    return files[0]


# -------------------------------------------------------------------------------------------- import, registry


def test_pack_imports_and_every_node_is_registered(comfy):
    log = comfy.server.log_text()
    pack_lines = [line for line in log.splitlines() if line.rstrip().endswith(f"custom_nodes/{PACK_FOLDER_NAME}")]
    assert pack_lines and not any("(IMPORT FAILED)" in line for line in pack_lines), "\n".join(pack_lines)
    assert "(IMPORT FAILED)" not in log

    object_info = comfy.server.get("/object_info")
    ours = {name: info for name, info in object_info.items()
            if info["python_module"] == f"custom_nodes.{PACK_FOLDER_NAME}"}
    assert set(ours) == PACK_NODES
    for name, info in ours.items():
        assert info["category"].startswith("Edit2Perceive"), name
        assert info["description"].strip(), f"{name} has no DESCRIPTION"
        for section in ("required", "optional"):
            for input_name, spec in info["input"].get(section, {}).items():
                options = spec[1] if len(spec) > 1 else {}
                assert options.get("tooltip", "").strip(), f"{name}.{input_name} has no tooltip"


# ------------------------------------------------------------------------------------------------ three tasks


def test_depth_keeps_the_input_size_and_the_hint_is_near_white(comfy):
    entry = _run_ok(comfy.server, perceive_prompt("depth", ODD_IMAGE, TEST_DIT, TEST_VAE, prefix="task_depth"))
    saved = {name: _saved(comfy.server, entry, node_id) for name, node_id in SAVE["depth"].items()}
    for name, path in saved.items():
        assert Image.open(path).size == ODD_SIZE_WH, name
    depth = _pixels(saved["depth"], "L")
    hint = _pixels(saved["depth_hint"], "RGB")
    assert np.ptp(depth) > 0, "the depth map is constant"
    # ControlNet hint: near = white, i.e. 1 - depth (depth_affine01 has near = 0), the same in all three channels
    np.testing.assert_allclose(hint, np.repeat(1.0 - depth[..., None], 3, axis=-1), atol=1.5 / 255)


def test_normals_keep_the_input_size_and_are_unit_vectors(comfy):
    entry = _run_ok(comfy.server, perceive_prompt("normal", ODD_IMAGE, TEST_DIT, TEST_VAE, prefix="task_normal"))
    path = _saved(comfy.server, entry, SAVE["normal"]["normal_map"])
    assert Image.open(path).size == ODD_SIZE_WH
    normals = 2.0 * _pixels(path, "RGB") - 1.0  # the map stores (n + 1) / 2
    length = np.linalg.norm(normals, axis=-1)
    # 8-bit storage moves each component by at most 1/255, i.e. the length by at most sqrt(3)/255 ~ 0.007
    assert np.abs(length - 1.0).max() < 0.02, f"|n| in [{length.min():.3f}, {length.max():.3f}]"


def test_fe2e_gives_depth_and_normals_from_one_perceive_at_the_input_size(comfy):
    """FE2E on the Step1X-Edit test DiT (ComfyUI's Flux class, LoRA as patches): one perceive node feeds the depth
    and the normal output nodes."""
    entry = _run_ok(comfy.server, fe2e_prompt(ODD_IMAGE, TEST_FE2E_DIT, TEST_VAE, TEST_FE2E_LORA))
    saved = {name: _saved(comfy.server, entry, node_id) for name, node_id in FE2E_SAVE.items()}
    for name, path in saved.items():
        assert Image.open(path).size == ODD_SIZE_WH, name
    depth = _pixels(saved["depth"], "L")  # the MASK output: FE2E's depth in [0,1], near = 0
    assert np.ptp(depth) > 0, "the depth map is constant"
    hint = _pixels(saved["depth_hint"], "RGB")
    assert np.abs(hint[..., 0] - (1.0 - depth)).max() <= 1.5 / 255, "the near-white hint is not 1 - depth"
    normals = 2.0 * _pixels(saved["normal_map"], "RGB") - 1.0
    length = np.linalg.norm(normals, axis=-1)
    assert np.abs(length - 1.0).max() < 0.02, f"|n| in [{length.min():.3f}, {length.max():.3f}]"


def test_matting_with_points_keeps_the_input_size_and_composes(comfy):
    prompt = perceive_prompt("matting", ODD_IMAGE, TEST_DIT, TEST_VAE, points=[SUBJECT_CLICK], prefix="task_matting")
    entry = _run_ok(comfy.server, prompt)
    saved = {name: _saved(comfy.server, entry, node_id) for name, node_id in SAVE["matting"].items()}
    for name, path in saved.items():
        assert Image.open(path).size == ODD_SIZE_WH, name
    image = _pixels(comfy.input_dir / ODD_IMAGE, "RGB")
    alpha = _pixels(saved["alpha"], "L")
    assert alpha.min() >= 0.0 and alpha.max() <= 1.0
    np.testing.assert_allclose(_pixels(saved["foreground"], "RGB"), image * alpha[..., None], atol=2.5 / 255)
    rgba = _pixels(saved["rgba"])
    assert rgba.shape == (*ODD_SIZE_WH[::-1], 4), "the RGBA output must have an alpha channel"
    np.testing.assert_allclose(rgba[..., :3], image, atol=1.5 / 255)
    np.testing.assert_allclose(rgba[..., 3], alpha, atol=1.5 / 255)
    # the point map is concentrated around the click, not spread over the image
    point_map = _pixels(saved["point_preview"], "L")
    assert point_map[SUBJECT_CLICK["y"], SUBJECT_CLICK["x"]] > 0.1
    assert point_map[0, -1] < point_map[SUBJECT_CLICK["y"], SUBJECT_CLICK["x"]] / 4  # far corner


# ----------------------------------------------------------------------------------------------- error cases


def test_a_missing_model_file_is_a_node_error_naming_it(comfy):
    missing = "flux1-kontext-dev-not-downloaded.safetensors"
    with pytest.raises(PromptRejected) as rejected:
        comfy.server.submit(perceive_prompt("depth", ODD_IMAGE, missing, TEST_VAE))
    # The loader validates names itself (a known file's download label stays valid once it is downloaded);
    # ComfyUI reports such a check's message under each input the check covers.
    errors = rejected.value.body["node_errors"][MODEL]["errors"]
    assert errors and all(error["type"] == "custom_validation_failed" and missing in error["details"]
                          for error in errors), errors


def test_bad_points_json_is_a_node_error_with_a_readable_message(comfy):
    prompt = perceive_prompt("matting", ODD_IMAGE, TEST_DIT, TEST_VAE, points=[SUBJECT_CLICK])
    prompt[POINTS]["inputs"]["positive_coords"] = '[{"x": 29, "y":'
    with pytest.raises(PromptRejected) as rejected:
        comfy.server.submit(prompt)
    node_errors = rejected.value.body["node_errors"]
    assert set(node_errors) == {POINTS}, node_errors
    text = " ".join(f"{e['message']} {e['details']}" for e in node_errors[POINTS]["errors"])
    assert "positive_coords" in text and "JSON" in text.upper(), text


def test_a_wrong_input_type_is_a_node_error(comfy):
    prompt = perceive_prompt("depth", ODD_IMAGE, TEST_DIT, TEST_VAE)
    prompt[PERCEIVE]["inputs"]["conditioning"] = [IMAGE, 0]
    with pytest.raises(PromptRejected) as rejected:
        comfy.server.submit(prompt)
    (error,) = rejected.value.body["node_errors"][PERCEIVE]["errors"]
    assert error["type"] == "return_type_mismatch", error
    assert "conditioning" in error["details"] and "IMAGE" in error["details"], error


def test_run_time_errors_carry_our_message_and_the_next_run_works(comfy):
    # clicks made on another image than the one perceived: the pack refuses with its own message, at run time
    prompt = perceive_prompt("matting", ODD_IMAGE, TEST_DIT, TEST_VAE, points=[SUBJECT_CLICK], prefix="err_points")
    prompt["40"] = node("LoadImage", image=BACKGROUND_IMAGE)
    prompt[POINTS]["inputs"]["image"] = ["40", 0]
    entry = comfy.server.run(prompt)
    assert entry["status"]["status_str"] == "error"
    (error,) = messages(entry, "execution_error")
    assert error["node_type"] == "E2PPerceive", error
    width, height = ODD_SIZE_WH
    assert f"{width}x{height}" in error["exception_message"] and "96x80" in error["exception_message"], error
    assert "Traceback" not in error["exception_message"]

    # an embeddings file without the expected tensors: the message names the file
    prompt = perceive_prompt("depth", ODD_IMAGE, TEST_DIT, TEST_VAE, prefix="err_embeddings")
    prompt[CONDITIONING]["inputs"]["embeddings"] = BROKEN_EMBEDDINGS
    entry = comfy.server.run(prompt)
    assert entry["status"]["status_str"] == "error"
    (error,) = messages(entry, "execution_error")
    assert error["node_type"] == "E2PTaskConditioning", error
    assert BROKEN_EMBEDDINGS in error["exception_message"] and "prompt_embeds" in error["exception_message"], error

    # the server is still usable: a correct prompt (new seed, so nothing comes from the cache) succeeds
    _run_ok(comfy.server, perceive_prompt("depth", ODD_IMAGE, TEST_DIT, TEST_VAE, seed=4321, prefix="after_error"))


# --------------------------------------------------------------------------------------------------- cancel


def test_interrupting_a_batch_stops_it_and_the_server_stays_usable(comfy):
    frames = 24
    prompt = perceive_prompt("depth", ODD_IMAGE, TEST_DIT, TEST_VAE, batch=frames, chunk_size=1, resolution=64,
                             seed=77, prefix="cancelled")
    events = asyncio.run(asyncio.wait_for(_interrupt_after_first_progress(comfy.server, prompt), timeout=600))
    progress, final = events["progress"], events["final"]
    assert progress["value"] < progress["max"], f"the batch had already finished when /interrupt was sent: {progress}"
    assert final["type"] == "execution_interrupted", final
    assert final["data"]["node_type"] == "E2PPerceive", final  # stopped inside the batch, not between nodes
    entry = comfy.server.wait(final["data"]["prompt_id"])
    assert not entry["outputs"], "an interrupted batch must not save partial results"

    _run_ok(comfy.server, perceive_prompt("depth", ODD_IMAGE, TEST_DIT, TEST_VAE, seed=78, prefix="after_cancel"))


async def _interrupt_after_first_progress(server: ComfyServer, prompt: dict) -> dict:
    """Run ``prompt``, POST /interrupt at the perceive node's first progress event."""
    events: dict = {}
    async for event in prompt_events(server, prompt):
        if event["type"] == "progress" and event["data"].get("node") == PERCEIVE and "progress" not in events:
            events["progress"] = event["data"]
            status, _ = await asyncio.to_thread(server.post, "/interrupt")
            assert status == 200
        elif event["type"] in FINAL_EVENTS:
            events["final"] = event
    return events


# ---------------------------------------------------------------------------------------------- shared encode


def test_one_encode_node_feeds_three_tasks_and_the_vae_encodes_each_frame_once(comfy):
    """depth, normals and matting of a 2-frame batch from one 'Encode Image': ComfyUI's VAE encoder (counted by the
    e2e probe extension) sees each frame once for the RGB, plus matting's own point-map context."""
    prompt = perceive_prompt("depth", ODD_IMAGE, TEST_DIT, TEST_VAE, batch=2, prefix="shared_depth")
    prompt["20"] = node("E2PEncodeImage", vae=[VAE, 0], image=[BATCH, 0], resize_mode="aligned", resolution=128)
    prompt[PERCEIVE]["inputs"]["encoded_image"] = ["20", 0]
    for task, first_id in (("normal", 30), ("matting", 40)):
        conditioning, perceive, output = str(first_id), str(first_id + 1), str(first_id + 2)
        prompt[conditioning] = node("E2PTaskConditioning", task=task, embeddings="auto")
        prompt[perceive] = {**prompt[PERCEIVE], "inputs": {**prompt[PERCEIVE]["inputs"],
                                                           "conditioning": [conditioning, 0]}}
        if task == "normal":
            prompt[output] = node("E2PNormalOutput", prediction=[perceive, 0], convention="controlnet_bae")
        else:
            prompt[output] = node("E2PMatteOutput", prediction=[perceive, 0])
        prompt[str(first_id + 3)] = node("PreviewImage", images=[output, 0] if task == "normal" else [output, 1])
    before = comfy.server.get("/e2e_probe/vae_encoded_frames")["frames"]
    _run_ok(comfy.server, prompt)
    encoded = comfy.server.get("/e2e_probe/vae_encoded_frames")["frames"] - before
    assert encoded == 2 + 2, f"the VAE encoder saw {encoded} frames; expected 2 (RGB, shared) + 2 (matting's map)"
