"""Downloads in a real ComfyUI server: the loader lists the task LoRA that is not on disk as a download; picking it
fetches it from the hub (the session's fake hub, the server's HF_ENDPOINT) into models/loras with progress events on
the WebSocket, and the prompt runs. Run again, the file is on disk and the hub sees no request.
"""

from __future__ import annotations

import asyncio

from .api_prompts import MODEL, perceive_prompt
from .comfy_server import ComfyServer, messages
from .conftest import ODD_IMAGE, TEST_DIT, TEST_VAE
from .events import prompt_events

LORA_NAME = "depth_lora.safetensors"
LORA_LABEL = "depth_lora.safetensors (download 610.0 MB)"  # the table's size of the real file


def test_a_lora_picked_as_a_download_arrives_in_models_and_the_prompt_runs(comfy):
    lora_on_disk = comfy.base_dir / "models" / "loras" / LORA_NAME
    choices = comfy.server.get("/object_info/E2PModelLoader")["E2PModelLoader"]["input"]["required"]["lora_name"][0]
    assert LORA_LABEL in choices and not lora_on_disk.exists()

    prompt = perceive_prompt("depth", ODD_IMAGE, TEST_DIT, TEST_VAE, lora=LORA_LABEL, prefix="downloaded_lora")
    final, progress = asyncio.run(asyncio.wait_for(_run_with_progress(comfy.server, prompt), timeout=600))
    assert final["type"] == "execution_success", (final, messages(comfy.server.wait(final["data"]["prompt_id"]),
                                                                  "execution_error"))
    served = comfy.hub.repos["Seq2Tri/Edit2Perceive"].files[LORA_NAME]
    assert lora_on_disk.read_bytes() == served
    assert [r.path.rsplit("/", 1)[1] for r in comfy.hub.downloads()] == [LORA_NAME]
    loader_progress = [(event["value"], event["max"]) for event in progress if event["node"] == MODEL]
    assert loader_progress[0] == (0, len(served)) and loader_progress[-1] == (len(served), len(served))

    comfy.hub.requests.clear()
    entry = comfy.server.run(perceive_prompt("depth", ODD_IMAGE, TEST_DIT, TEST_VAE, lora=LORA_NAME, seed=5,
                                             prefix="present_lora"))
    assert entry["status"]["status_str"] == "success", messages(entry, "execution_error")
    assert comfy.hub.requests == []


async def _run_with_progress(server: ComfyServer, prompt: dict) -> tuple[dict, list[dict]]:
    """(the final event, the data of every progress event) of a run of ``prompt``."""
    events = [event async for event in prompt_events(server, prompt)]
    return events[-1], [event["data"] for event in events if event["type"] == "progress"]
