"""Output nodes: a prediction -> ComfyUI IMAGE / MASK in the conventions downstream nodes expect.

The conventions themselves (depth polarity and normalisation, normal axes) live in ``e2p_core.conventions``; these
functions only change layouts: IMAGE is [B,H,W,C] in 0..1, MASK is [B,H,W].
"""

import torch

from ..e2p_core.conventions import (
    NORMAL_AXIS_SIGNS,
    depth_hint,
    normalize_depth,
    normals_to_convention,
    normals_to_rgb01,
)
from ..e2p_core.video import align_depth_video
from .colormap import turbo
from .prediction import E2P_PREDICTION, Prediction

DEPTH_POLARITIES = ("near_white", "near_black")
DEPTH_NORMALIZATIONS = ("none", "minmax", "percentile", "sequence", "temporal")
NORMAL_CONVENTIONS = tuple(NORMAL_AXIS_SIGNS)


def _as_image(maps: torch.Tensor) -> torch.Tensor:
    """[B,C,H,W] -> IMAGE [B,H,W,3] (one channel is repeated to gray)."""
    return maps.expand(-1, 3, -1, -1).movedim(1, -1).contiguous().float()


def depth_outputs(prediction: Prediction, polarity: str = "near_white", normalization: str = "none"
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hint IMAGE in ``polarity``, depth MASK with near = 0, colour preview IMAGE with near = red)."""
    prediction.expect("depth")
    if normalization == "temporal":  # co-align the frames of a video (matched by optical flow), one range for the clip
        depth_affine01 = align_depth_video(prediction.output, "aligned", images=prediction.images)  # [B,1,H,W]
    else:
        depth_affine01 = normalize_depth(prediction.output, normalization)  # [B,1,H,W], near = 0
    hint = depth_hint(depth_affine01, polarity)
    preview = turbo(1 - depth_affine01[:, 0])  # [B,H,W,3]
    return _as_image(hint), depth_affine01[:, 0].contiguous(), preview


def normal_outputs(prediction: Prediction, convention: str = "controlnet_bae") -> tuple[torch.Tensor]:
    """(normal map IMAGE ``(n+1)/2`` in ``convention``,)."""
    prediction.expect("normal")
    return (_as_image(normals_to_rgb01(normals_to_convention(prediction.output, convention))),)


def matte_outputs(prediction: Prediction) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(alpha MASK 1 = foreground, foreground IMAGE = image x alpha, RGBA IMAGE)."""
    prediction.expect("matting")
    alpha = prediction.output[:, 0].float()  # [B,H,W]
    rgb = prediction.images[..., :3].to(alpha.device, torch.float32)  # [B,H,W,3]
    return alpha.contiguous(), rgb * alpha[..., None], torch.cat([rgb, alpha[..., None]], dim=-1)


PREDICTION_INPUT = (E2P_PREDICTION, {"tooltip": "The prediction of 'Edit2Perceive Perceive'."})
POLARITY_INPUT = (list(DEPTH_POLARITIES), {
    "default": "near_white",
    "tooltip": "Depth hint polarity: near_white is what ControlNet depth models expect; near_black = the model's "
               "own depth."})
NORMALIZATION_INPUT = (list(DEPTH_NORMALIZATIONS), {
    "default": "none",
    "tooltip": "Stretch depth to 0..1: 'none' keeps the model's own range (already normalised, flicker-free); "
               "'minmax' / 'percentile' (2..98%) per frame; 'sequence' one range for the whole batch (videos); "
               "'temporal' co-aligns every frame's scale and shift to its neighbours first, matching them through "
               "the optical flow of the frames (flicker-free videos)."})
CONVENTION_INPUT = (list(NORMAL_CONVENTIONS), {
    "default": "controlnet_bae",
    "tooltip": "Normal axes in RGB: controlnet_bae = R +x left, G +y up, B +z toward the camera (ControlNet "
               "normalbae); opengl = R +x right (Blender, Marigold); directx = R +x right, G +y down."})
# (RETURN_TYPES, RETURN_NAMES, OUTPUT_TOOLTIPS), shared with the all-in-one nodes.
DEPTH_RETURNS = (
    ("IMAGE", "MASK", "IMAGE"),
    ("depth_hint", "depth", "preview"),
    ("Depth as a 3-channel image for ControlNet (near = white by default).",
     "Float depth in 0..1, near = 0 (normalised as chosen), for compositing or saving.",
     "Colourised depth for viewing (near = red, far = blue)."),
)
NORMAL_RETURNS = (
    ("IMAGE",),
    ("normal_map",),
    ("Normal map (n+1)/2 in RGB, in the chosen axis convention.",),
)
MATTE_RETURNS = (
    ("MASK", "IMAGE", "IMAGE"),
    ("alpha", "foreground", "rgba"),
    ("Alpha matte, 1 = foreground (ComfyUI MASK; invert it for core 'Join Image with Alpha').",
     "The image multiplied by alpha (3 channels, black background).",
     "The image with alpha as a 4th channel, for saving as PNG."),
)


class E2PDepthOutput:
    DESCRIPTION = ("Depth from an Edit2Perceive prediction: a ControlNet hint (near = white by default), the float "
                   "depth (near = 0) and a colour preview. 'sequence' normalisation keeps videos flicker-free.")
    CATEGORY = "Edit2Perceive/outputs"
    FUNCTION = "convert"
    RETURN_TYPES, RETURN_NAMES, OUTPUT_TOOLTIPS = DEPTH_RETURNS

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"prediction": PREDICTION_INPUT, "polarity": POLARITY_INPUT,
                             "normalization": NORMALIZATION_INPUT}}

    def convert(self, prediction, polarity, normalization):
        return depth_outputs(prediction, polarity, normalization)


class E2PNormalOutput:
    DESCRIPTION = ("Surface normals from an Edit2Perceive prediction as an RGB normal map, in the ControlNet "
                   "(normalbae), OpenGL or DirectX axis convention.")
    CATEGORY = "Edit2Perceive/outputs"
    FUNCTION = "convert"
    RETURN_TYPES, RETURN_NAMES, OUTPUT_TOOLTIPS = NORMAL_RETURNS

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"prediction": PREDICTION_INPUT, "convention": CONVENTION_INPUT}}

    def convert(self, prediction, convention):
        return normal_outputs(prediction, convention)


class E2PMatteOutput:
    DESCRIPTION = ("The alpha matte of an Edit2Perceive matting prediction (MASK, 1 = foreground), the foreground "
                   "(image x alpha) and an RGBA image.")
    CATEGORY = "Edit2Perceive/outputs"
    FUNCTION = "convert"
    RETURN_TYPES, RETURN_NAMES, OUTPUT_TOOLTIPS = MATTE_RETURNS

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"prediction": PREDICTION_INPUT}}

    def convert(self, prediction):
        return matte_outputs(prediction)
