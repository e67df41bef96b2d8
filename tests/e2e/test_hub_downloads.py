"""Downloads in a real ComfyUI server: the loaders list the task LoRA and the Flux VAE that are not on disk as
downloads; picking them fetches them from the hub (the session's fake hub, the server's HF_ENDPOINT) into
models/loras and models/vae with progress events on the WebSocket, and the prompt runs. Run again, the files are on
disk and the hub sees no request.
"""

from __future__ import annotations

import asyncio

from e2p_core.hub import MODEL_FILES

from .api_prompts import MODEL, VAE, node, perceive_prompt
from .comfy_server import ComfyServer, messages
from .conftest import ODD_IMAGE, TEST_DIT, TEST_VAE
from .events import prompt_events

LORA, FLUX_VAE = MODEL_FILES["depth_lora"], MODEL_FILES["vae"]
LORA_LABEL = "depth_lora.safetensors (download 610.0 MB)"  # the table's sizes of the real files
VAE_LABEL = "ae.safetensors (download 335.3 MB)"


def test_files_picked_as_downloads_arrive_in_models_and_the_prompt_runs(comfy):
    # The test VAE plays the Flux VAE, byte-identical in Kontext's (gated) and schnell's (ungated) repositories.
    vae_bytes = (comfy.base_dir / "models" / "vae" / TEST_VAE).read_bytes()
    for hub_file in (FLUX_VAE.hub, FLUX_VAE.ungated_copy):
        comfy.hub.add_file(hub_file.repo, hub_file.path, vae_bytes, gated=hub_file == FLUX_VAE.hub)
    lora_bytes = comfy.hub.repos[LORA.hub.repo].files[LORA.hub.path]
    lora_on_disk, vae_on_disk = (comfy.base_dir / "models" / file.folder / file.name for file in (LORA, FLUX_VAE))
    info = comfy.server.get("/object_info")
    assert LORA_LABEL in info["E2PModelLoader"]["input"]["required"]["lora_name"][0]
    assert VAE_LABEL in info["E2PVAELoader"]["input"]["required"]["vae_name"][0]
    assert not lora_on_disk.exists() and not vae_on_disk.exists()

    prompt = perceive_prompt("depth", ODD_IMAGE, TEST_DIT, TEST_VAE, lora=LORA_LABEL, prefix="downloaded")
    prompt[VAE] = node("E2PVAELoader", vae_name=VAE_LABEL)
    final, progress = asyncio.run(asyncio.wait_for(_run_with_progress(comfy.server, prompt), timeout=600))
    assert final["type"] == "execution_success", (final, messages(comfy.server.wait(final["data"]["prompt_id"]),
                                                                  "execution_error"))
    assert lora_on_disk.read_bytes() == lora_bytes and vae_on_disk.read_bytes() == vae_bytes
    assert sorted(r.path.rsplit("/", 1)[1] for r in comfy.hub.downloads()) == [FLUX_VAE.name, LORA.name]
    assert not any("FLUX.1-Kontext-dev/resolve" in r.path for r in comfy.hub.requests)  # schnell's copy, no token
    for node_id, size in ((MODEL, len(lora_bytes)), (VAE, len(vae_bytes))):
        bytes_seen = [(event["value"], event["max"]) for event in progress if event["node"] == node_id]
        assert bytes_seen[0] == (0, size) and bytes_seen[-1] == (size, size), (node_id, bytes_seen)

    comfy.hub.requests.clear()
    prompt = perceive_prompt("depth", ODD_IMAGE, TEST_DIT, TEST_VAE, lora=LORA.name, seed=5, prefix="present")
    prompt[VAE] = node("E2PVAELoader", vae_name=VAE_LABEL)  # a label saved in a workflow still works
    entry = comfy.server.run(prompt)
    assert entry["status"]["status_str"] == "success", messages(entry, "execution_error")
    assert comfy.hub.requests == []


async def _run_with_progress(server: ComfyServer, prompt: dict) -> tuple[dict, list[dict]]:
    """(the final event, the data of every progress event) of a run of ``prompt``."""
    events = [event async for event in prompt_events(server, prompt)]
    return events[-1], [event["data"] for event in events if event["type"] == "progress"]
