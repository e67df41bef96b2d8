"""Downloads in a real ComfyUI server: the loader lists the task LoRA that is not on disk as a download; picking it
fetches it from the hub (the session's fake hub, the server's HF_ENDPOINT) into models/loras with progress events on
the WebSocket, and the prompt runs. Run again, the file is on disk and the hub sees no request.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import aiohttp

from .api_prompts import MODEL, perceive_prompt
from .comfy_server import ComfyServer, messages
from .conftest import ODD_IMAGE, TEST_DIT, TEST_VAE

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
    """Queue ``prompt`` with a WebSocket listening; (the final event, every progress event of the prompt)."""
    client_id = f"e2e-{uuid.uuid4()}"
    ws_url = server.url.replace("http://", "ws://") + f"/ws?clientId={client_id}"
    progress = []
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url) as socket:
        async with session.post(server.url + "/prompt", json={"prompt": prompt, "client_id": client_id}) as reply:
            assert reply.status == 200, await reply.text()
            prompt_id = (await reply.json())["prompt_id"]
        async for message in socket:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            event = json.loads(message.data)
            data = event.get("data", {})
            if data.get("prompt_id") != prompt_id:
                continue
            if event["type"] == "progress":
                progress.append(data)
            elif event["type"] in ("execution_interrupted", "execution_error", "execution_success"):
                return event, progress
    raise AssertionError(f"the WebSocket closed before prompt {prompt_id} finished")
