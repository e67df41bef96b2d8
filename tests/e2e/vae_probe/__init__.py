"""Test-only ComfyUI extension the e2e server loads beside the pack: it counts the frames that go through the VAE
encoder network (ComfyUI's own ``Encoder.forward``, whichever node or code calls it) and serves the running count at
``GET /e2e_probe/vae_encoded_frames``, so a test can check that a graph encodes each frame once."""

import comfy.ldm.modules.diffusionmodules.model as vae_model
from aiohttp import web
from server import PromptServer

_encoded_frames = 0
_forward = vae_model.Encoder.forward


def _counting_forward(self, x, *args, **kwargs):
    global _encoded_frames
    _encoded_frames += x.shape[0]
    return _forward(self, x, *args, **kwargs)


vae_model.Encoder.forward = _counting_forward


@PromptServer.instance.routes.get("/e2e_probe/vae_encoded_frames")
async def encoded_frames(request):
    return web.json_response({"frames": _encoded_frames})


NODE_CLASS_MAPPINGS = {}
