"""The Python side of the point picker that ``web/point_picker.js`` draws on 'Edit2Perceive Point Prompt'.

The picker restates no rule of ``e2p_core``; it asks the server:

* ``GET /e2p/point_map`` -> the soft point map the model will see for the node's clicks, computed by the pipeline's
  own rasterisation (:func:`~..e2p_core.pipeline.rasterize_point_prompt`) at the processing size of the perceive
  node it feeds, as an 8-bit grey PNG that the picker lays over the picture (a 400 with a message for bad input);
* the picture of the last run: the node saves its first frame to ComfyUI's temp folder and returns it as a UI output
  under :data:`PICTURE_UI_KEY` (not ``images``, so the frontend adds no preview of its own under the picker).
"""

import asyncio
import hashlib
import io
import logging
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..e2p_core.checkpoints import write_atomically
from ..e2p_core.errors import InputError
from ..e2p_core.images import plan_geometry
from ..e2p_core.pipeline import PointPrompt, rasterize_point_prompt
from ..e2p_core.points import parse_points, to_pixel_coords
from .perceive import NATIVE_RESOLUTION, RESOLUTION_INPUT

logger = logging.getLogger(__name__)

POINT_MAP_ROUTE = "/e2p/point_map"
PICTURE_UI_KEY = "e2p_picture"
PICTURE_MAX_SIDE_PX = 1024  # the picker shows a node-sized picture; a 4K frame would only slow the page
DEFAULT_RESOLUTION = RESOLUTION_INPUT[1]["default"]


def point_map_png(query: Mapping[str, str]) -> bytes:
    """The point map for the picker's query, as an 8-bit grey PNG at the processing size (padding excluded).

    ``points`` (the node's point JSON), ``coords_space`` and ``mode`` are the point prompt node's widgets; ``width``
    and ``height`` the image's size in pixels; ``resize_mode`` and ``resolution`` the perceive node's (0 = native).
    """
    width, height = _int_param(query, "width"), _int_param(query, "height")
    resolution = _int_param(query, "resolution", DEFAULT_RESOLUTION)
    geometry = plan_geometry((height, width), query.get("resize_mode", "aligned"),
                             "native" if resolution == NATIVE_RESOLUTION else resolution)
    points_px = to_pixel_coords(parse_points(query.get("points", "")), width, height,
                                query.get("coords_space", "auto"))
    mode = query.get("mode", "app")
    if mode not in ("app", "clicks"):
        raise InputError(f"mode is {mode!r}; the picker draws clicks, expected 'app' or 'clicks'")
    point_map = rasterize_point_prompt(PointPrompt(points_px=points_px, mode=mode), geometry)
    buffer = io.BytesIO()
    Image.fromarray(np.round(point_map * 255).astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def _int_param(query: Mapping[str, str], name: str, default: int | None = None) -> int:
    text = query.get(name)
    if text is None:
        if default is None:
            raise InputError(f"{name} is missing; expected an integer number of pixels")
        return default
    try:
        return int(text)
    except ValueError:
        raise InputError(f"{name} is {text!r}; expected an integer number of pixels") from None


async def _handle_point_map(request):
    from aiohttp import web  # ComfyUI's server library; only needed inside a running server

    try:
        png = await asyncio.to_thread(point_map_png, request.rel_url.query)
    except InputError as error:
        return web.Response(status=400, text=str(error))
    return web.Response(body=png, content_type="image/png", headers={"Cache-Control": "no-store"})


def register_routes() -> bool:
    """Add the picker's route to ComfyUI's server; False outside a running server (tests importing the nodes).

    ComfyUI's ``main.py`` imports its ``server`` module and creates ``PromptServer.instance`` before it loads custom
    nodes; looking it up in ``sys.modules`` never imports the server where none runs.
    """
    server = sys.modules.get("server")
    prompt_server = getattr(getattr(server, "PromptServer", None), "instance", None)
    if prompt_server is None:
        return False
    prompt_server.routes.get(POINT_MAP_ROUTE)(_handle_point_map)
    return True


def save_picture(image: torch.Tensor) -> dict:
    """The first frame of an IMAGE [B,H,W,C] as a PNG in ComfyUI's temp folder (at most 1024 px a side) -> the UI
    entry the frontend reads it back with (``/view?type=temp``), plus the frame's true ``width`` and ``height``."""
    import folder_paths

    frame = image[0, ..., :3].detach().cpu().float().clamp(0, 1)
    if frame.shape[-1] == 1:
        frame = frame.expand(-1, -1, 3)
    height, width = frame.shape[:2]
    picture = Image.fromarray(np.round(frame.numpy() * 255).astype(np.uint8))
    picture.thumbnail((PICTURE_MAX_SIDE_PX, PICTURE_MAX_SIDE_PX), Image.BILINEAR)
    # Named by content: a re-run with the same picture rewrites nothing, different pictures never collide.
    name = f"e2p_picture_{hashlib.sha256(picture.tobytes()).hexdigest()[:20]}_{width}x{height}.png"
    path = Path(folder_paths.get_temp_directory()) / name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda tmp_name: picture.save(tmp_name, format="PNG", compress_level=1))
    return {"filename": name, "subfolder": "", "type": "temp", "width": int(width), "height": int(height)}
