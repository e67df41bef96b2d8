"""The encode node: one VAE encode of an image batch, shared by several perceive nodes (depth, normals, matting).

The RGB context latent does not depend on the task, so a graph that predicts all three from one picture encodes it
once (``e2p_core.pipeline.encode_image``) and hands the latent to every 'Edit2Perceive Perceive'.
"""

import comfy.model_management
import torch

from ..e2p_core.pipeline import EncodedImage, encode_image
from .comfy_backend import ComfyCodec
from .perceive import NATIVE_RESOLUTION, RESIZE_MODES, RESOLUTION_INPUT
from .prediction import E2P_ENCODED_IMAGE


def run_encode(vae, images: torch.Tensor, resize_mode: str = "aligned", resolution: int = 768) -> EncodedImage:
    """IMAGE [B,H,W,C] -> its RGB context latent (float32 on ComfyUI's intermediate device, as IMAGE batches are)."""
    codec = ComfyCodec(vae, torch.float32, comfy.model_management.intermediate_device())
    return encode_image(codec, images.detach().cpu()[..., :3], resize=resize_mode,
                        resolution="native" if resolution == NATIVE_RESOLUTION else resolution)


class E2PEncodeImage:
    DESCRIPTION = ("Encodes the image batch with the VAE once, for several 'Edit2Perceive Perceive' nodes (depth, "
                   "normals and matting of the same picture share the encode). Use the same resize mode and "
                   "resolution in the perceive nodes.")
    CATEGORY = "Edit2Perceive"
    FUNCTION = "encode"
    RETURN_TYPES = (E2P_ENCODED_IMAGE,)
    RETURN_NAMES = ("encoded_image",)
    OUTPUT_TOOLTIPS = ("The RGB context latent of every frame, for the perceive nodes' 'encoded_image' input.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": ("VAE", {"tooltip": "The Flux VAE (ae.safetensors), the same the perceive nodes use."}),
            "image": ("IMAGE", {"tooltip": "Image or video frames [B,H,W,3]; connect the same image to the perceive "
                                           "nodes."}),
            "resize_mode": (list(RESIZE_MODES), {"default": "aligned",
                                                 "tooltip": "As the perceive nodes' resize_mode."}),
            "resolution": RESOLUTION_INPUT,
        }}

    def encode(self, vae, image, resize_mode, resolution):
        return (run_encode(vae, image, resize_mode, resolution),)
