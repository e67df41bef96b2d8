"""Every ``workflows/*.json`` in ComfyUI's real frontend (headless Chromium), then validated and run by the server.

A workflow must load with no missing node types and no frontend alert (e.g. a schema error), and the frontend's
``graphToPrompt`` conversion must be accepted by ``POST /prompt``. What a CI machine cannot have is handled openly:

* swapped for test files (the graph is unchanged, only these widget values are):
  - E2PModelLoader ``model_name``: FLUX.1 Kontext [dev] (24 GB) -> the test DiT with the same Flux layout;
  - E2PModelLoader / LoraLoaderModelOnly ``lora_name``: the released task LoRAs -> the test kohya LoRA;
  - E2PVAELoader ``vae_name``: the Flux ``ae.safetensors`` -> the test VAE (full Flux VAE layout, random weights);
  - ``resolution`` of E2PPerceive and the all-in-one nodes: 768 -> 128, only for CPU time;
  - E2PFE2EModelLoader ``model_name`` / ``lora_name``: Step1X-Edit (25 GB) and FE2E's LoRA -> the FE2E test DiT
    (same layout: no guidance embedder, with a connector) and a test FE2E LoRA; E2PVAELoader's Step1X-Edit VAE ->
    the test VAE; ``no_info.npz`` is the test prompt cache under that name;
  - E2PFE2EPerceive ``resolution_mode`` / ``resolution``: FE2E's buckets (1024x768) -> longer side 128, for CPU
    time;
  - the LoadImage files ``e2p_example.png`` / ``e2p_background.png`` are the test's pictures under those names;
* not swapped, because no test file can stand in for them here: FLUX.1 [dev] (UNETLoader), its CLIP-L and T5-XXL
  (DualCLIPLoader, T5 alone is 9 GB) and the Flux ControlNets (ControlNetLoader). The server must report exactly
  these inputs as ``value_not_in_list`` node errors and drop only the outputs that depend on them; every other
  output (the Edit2Perceive part of every workflow) must run and write its images.
"""

from __future__ import annotations

import shutil

import pytest

from .comfy_server import REPO_ROOT, messages
from .conftest import BACKGROUND_IMAGE, ODD_IMAGE, TEST_DIT, TEST_FE2E_DIT, TEST_FE2E_LORA, TEST_LORA, TEST_VAE
from .frontend import Frontend, LoadedWorkflow, read_workflow

WORKFLOW_DIR = REPO_ROOT / "workflows"
EXPECTED_WORKFLOWS = {"e2p_depth_controlnet", "e2p_normal_controlnet", "e2p_matting_composite", "e2p_all_tasks",
                      "fe2e_depth_normal"}
WORKFLOW_IMAGES = {"e2p_example.png": ODD_IMAGE, "e2p_background.png": BACKGROUND_IMAGE}  # name -> test picture

SWAPS = {
    ("E2PModelLoader", "model_name"): TEST_DIT,
    ("E2PModelLoader", "lora_name"): TEST_LORA,
    ("LoraLoaderModelOnly", "lora_name"): TEST_LORA,
    ("E2PVAELoader", "vae_name"): TEST_VAE,
    ("E2PPerceive", "resolution"): 128,
    ("E2PDepthAllInOne", "resolution"): 128,
    ("E2PNormalAllInOne", "resolution"): 128,
    ("E2PMattingAllInOne", "resolution"): 128,
    ("E2PFE2EModelLoader", "model_name"): TEST_FE2E_DIT,
    ("E2PFE2EModelLoader", "lora_name"): TEST_FE2E_LORA,
    ("E2PFE2EPerceive", "resolution_mode"): "longer_side",
    ("E2PFE2EPerceive", "resolution"): 128,
}
UNAVAILABLE = {("UNETLoader", "unet_name"), ("DualCLIPLoader", "clip_name1"), ("DualCLIPLoader", "clip_name2"),
               ("ControlNetLoader", "control_net_name")}
OUTPUT_NODES = {"SaveImage", "PreviewImage"}


def test_each_workflow_has_its_thumbnail():
    names = {path.stem for path in WORKFLOW_DIR.glob("*.json")}
    assert names == EXPECTED_WORKFLOWS
    for name in names:
        assert (WORKFLOW_DIR / f"{name}.jpg").stat().st_size > 10_000, f"{name}.jpg is missing or empty"


@pytest.fixture(scope="module")
def loaded(comfy) -> dict[str, LoadedWorkflow]:
    for workflow_name, test_picture in WORKFLOW_IMAGES.items():
        shutil.copyfile(comfy.input_dir / test_picture, comfy.input_dir / workflow_name)
    with Frontend(comfy.server.url) as frontend:
        results = {path.stem: frontend.load(read_workflow(path)) for path in sorted(WORKFLOW_DIR.glob("*.json"))}
    assert not frontend.log.page_errors, frontend.log.page_errors
    return results


@pytest.mark.parametrize("name", sorted(EXPECTED_WORKFLOWS))
def test_workflow_loads_in_the_frontend_and_its_prompt_runs(comfy, loaded, name):
    result = loaded[name]
    assert result.missing_types == [], f"node types the frontend does not know: {result.missing_types}"
    assert not result.load_errors and not result.alerts, result.load_errors + result.alerts
    assert result.api_error is None and result.api_prompt, result.api_error
    prompt = _swapped(result.api_prompt)

    status, body = comfy.server.post("/prompt", {"prompt": prompt, "client_id": f"ui-{name}"})
    assert status == 200, f"no output of {name} passed validation: {body}"
    reported = {(prompt[node_id]["class_type"], error["extra_info"]["input_name"], error["type"])
                for node_id, node_error in body["node_errors"].items() for error in node_error["errors"]}
    expected = {(node["class_type"], input_name, "value_not_in_list")
                for node in prompt.values() for class_type, input_name in UNAVAILABLE
                if node["class_type"] == class_type}
    assert reported == expected

    entry = comfy.server.wait(body["prompt_id"])
    assert entry["status"]["status_str"] == "success", messages(entry, "execution_error")
    runnable = _outputs_not_needing(prompt, {cls for cls, _ in UNAVAILABLE})
    assert runnable, f"{name} has no output that runs without the unavailable models"
    # (the point prompt node also reports its picture for the point picker: a UI output, not a saved image)
    assert {node_id for node_id in entry["outputs"] if prompt[node_id]["class_type"] in OUTPUT_NODES} == runnable
    for node_id in runnable:
        files = comfy.server.output_images(entry, node_id)
        assert files and all(path.is_file() for path in files), f"{name}: node {node_id} wrote {files}"
    # core LoRA loaders patch the pack's native MODEL: ComfyUI names any LoRA key it could not map
    assert "lora key not loaded" not in comfy.server.log_text()


def _swapped(prompt: dict) -> dict:
    swapped = {}
    for node_id, node in prompt.items():
        inputs = dict(node["inputs"])
        for (class_type, input_name), value in SWAPS.items():
            if node["class_type"] == class_type and input_name in inputs and inputs[input_name] != "none":
                inputs[input_name] = value
        swapped[node_id] = {**node, "inputs": inputs}
    return swapped


def _outputs_not_needing(prompt: dict, unavailable_types: set[str]) -> set[str]:
    """Ids of the output nodes none of whose ancestors is of an unavailable type."""

    def needs_unavailable(node_id: str, seen: set[str]) -> bool:
        node = prompt[node_id]
        if node["class_type"] in unavailable_types:
            return True
        seen.add(node_id)
        links = [value[0] for value in node["inputs"].values() if isinstance(value, list) and len(value) == 2]
        return any(needs_unavailable(str(link), seen) for link in links if str(link) not in seen)

    return {node_id for node_id, node in prompt.items()
            if node["class_type"] in OUTPUT_NODES and not needs_unavailable(node_id, set())}
