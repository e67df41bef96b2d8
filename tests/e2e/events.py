"""A prompt's events as ComfyUI's WebSocket sends them (``/ws?clientId=...``), for tests that watch a run."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from .comfy_server import ComfyServer

FINAL_EVENTS = ("execution_success", "execution_error", "execution_interrupted")


async def prompt_events(server: ComfyServer, prompt: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """Queue ``prompt`` with a WebSocket listening; yield its events (``{"type", "data"}``) in order, the final one
    (success, error or interrupted) last. The caller may act on the server in between, e.g. POST /interrupt."""
    client_id = f"e2e-{uuid.uuid4()}"
    ws_url = server.url.replace("http://", "ws://") + f"/ws?clientId={client_id}"
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url) as socket:
        async with session.post(server.url + "/prompt", json={"prompt": prompt, "client_id": client_id}) as reply:
            assert reply.status == 200, await reply.text()
            prompt_id = (await reply.json())["prompt_id"]
        async for message in socket:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue  # binary preview frames
            event = json.loads(message.data)
            if event.get("data", {}).get("prompt_id") != prompt_id:
                continue
            yield event
            if event["type"] in FINAL_EVENTS:
                return
    raise AssertionError(f"the WebSocket closed before prompt {prompt_id} finished")
