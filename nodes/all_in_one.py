"""All-in-one nodes for beginners: image in, depth / normals / matte out, with the paper's settings (1 step, seed 42,
aligned resize). Each one calls the same functions as the separate nodes: task conditioning, point prompt, perceive,
output conversion.
"""

from .conditioning import (
    AUTO,
    CLIP_INPUT,
    EMBEDDINGS_TOOLTIP,
    clip_needed,
    embeddings_choices,
    task_embeddings,
    to_conditioning,
)
from .outputs import (
    CONVENTION_INPUT,
    DEPTH_RETURNS,
    MATTE_RETURNS,
    NORMAL_RETURNS,
    NORMALIZATION_INPUT,
    POLARITY_INPUT,
    depth_outputs,
    matte_outputs,
    normal_outputs,
)
from .perceive import ENCODED_IMAGE_INPUT, RESOLUTION_INPUT, run_perceive
from .point_prompt import (
    COORD_SPACE_TOOLTIP,
    COORD_SPACES,
    MASK_TOOLTIP,
    NEGATIVE_TOOLTIP,
    POSITIVE_TOOLTIP,
    make_point_prompt,
    validate_point_strings,
)

HIDDEN = {"graph": "PROMPT", "node_id": "UNIQUE_ID"}


def _common_inputs() -> dict:
    return {
        "model": ("MODEL", {"tooltip": "The Edit2Perceive DiT for this task (Edit2Perceive Model Loader)."}),
        "vae": ("VAE", {"tooltip": "The Flux VAE (ae.safetensors, core 'Load VAE')."}),
        "image": ("IMAGE", {"tooltip": "Image or video frames [B,H,W,3]."}),
        "embeddings": (embeddings_choices(), {"default": AUTO, "tooltip": EMBEDDINGS_TOOLTIP}),
        "resolution": RESOLUTION_INPUT,
    }


def _predict(task, model, vae, image, embeddings, resolution, clip, graph, node_id, point_prompt=None,
             encoded_image=None):
    conditioning = to_conditioning(task, task_embeddings(task, embeddings, clip, "", graph, node_id))
    return run_perceive(model, vae, conditioning, image, resolution=resolution, point_prompt=point_prompt,
                        encoded_image=encoded_image)


class _AllInOne:
    TASK = ""
    CATEGORY = "Edit2Perceive/all-in-one"
    FUNCTION = "run"

    def check_lazy_status(self, *args, clip=None, graph=None, node_id=None, **kwargs):
        return ["clip"] if clip is None and clip_needed(self.TASK, "", graph, node_id) else []


class E2PDepthAllInOne(_AllInOne):
    DESCRIPTION = ("Depth in one node: Edit2Perceive on every frame, returned as a ControlNet hint (near = white), "
                   "the float depth (near = 0) and a colour preview, at the input size.")
    TASK = "depth"
    RETURN_TYPES, RETURN_NAMES, OUTPUT_TOOLTIPS = DEPTH_RETURNS

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {**_common_inputs(), "polarity": POLARITY_INPUT, "normalization": NORMALIZATION_INPUT},
                "optional": {"clip": CLIP_INPUT, "encoded_image": ENCODED_IMAGE_INPUT}, "hidden": HIDDEN}

    def run(self, model, vae, image, embeddings, resolution, polarity, normalization, clip=None, graph=None,
            node_id=None, encoded_image=None):
        prediction = _predict(self.TASK, model, vae, image, embeddings, resolution, clip, graph, node_id,
                              encoded_image=encoded_image)
        return depth_outputs(prediction, polarity, normalization)


class E2PNormalAllInOne(_AllInOne):
    DESCRIPTION = ("Surface normals in one node: Edit2Perceive on every frame, returned as an RGB normal map in the "
                   "chosen axis convention (ControlNet normalbae by default), at the input size.")
    TASK = "normal"
    RETURN_TYPES, RETURN_NAMES, OUTPUT_TOOLTIPS = NORMAL_RETURNS

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {**_common_inputs(), "convention": CONVENTION_INPUT},
                "optional": {"clip": CLIP_INPUT, "encoded_image": ENCODED_IMAGE_INPUT}, "hidden": HIDDEN}

    def run(self, model, vae, image, embeddings, resolution, convention, clip=None, graph=None, node_id=None,
            encoded_image=None):
        prediction = _predict(self.TASK, model, vae, image, embeddings, resolution, clip, graph, node_id,
                              encoded_image=encoded_image)
        return normal_outputs(prediction, convention)


class E2PMattingAllInOne(_AllInOne):
    DESCRIPTION = ("Point-prompted matting in one node: click the foreground (KJNodes Points Editor) or give a rough "
                   "mask; returns the alpha matte (1 = foreground), the foreground and an RGBA image.")
    TASK = "matting"
    RETURN_TYPES, RETURN_NAMES, OUTPUT_TOOLTIPS = MATTE_RETURNS

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **_common_inputs(),
                "positive_coords": ("STRING", {"default": "[]", "multiline": True, "tooltip": POSITIVE_TOOLTIP}),
                "coords_space": (list(COORD_SPACES), {"default": "auto", "tooltip": COORD_SPACE_TOOLTIP}),
            },
            "optional": {
                "negative_coords": ("STRING", {"default": "", "multiline": True, "tooltip": NEGATIVE_TOOLTIP}),
                "mask": ("MASK", {"tooltip": MASK_TOOLTIP}),
                "clip": CLIP_INPUT,
                "encoded_image": ENCODED_IMAGE_INPUT,
            },
            "hidden": HIDDEN,
        }

    @classmethod
    def VALIDATE_INPUTS(cls, positive_coords=None, negative_coords=None):
        return validate_point_strings(positive_coords=positive_coords, negative_coords=negative_coords)

    def run(self, model, vae, image, embeddings, resolution, positive_coords, coords_space, negative_coords="",
            mask=None, clip=None, graph=None, node_id=None, encoded_image=None):
        point_prompt, _ = make_point_prompt(image, positive_coords, coords_space, "app", negative_coords, mask)
        prediction = _predict(self.TASK, model, vae, image, embeddings, resolution, clip, graph, node_id,
                              point_prompt, encoded_image)
        return matte_outputs(prediction)
