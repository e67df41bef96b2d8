"""The matting point prompt: KJNodes Points Editor clicks (or a mask) -> an Edit2Perceive point prompt + preview.

Parsing and rasterisation are e2p_core's (``e2p_core.points``). The prompt is rasterised again by the perceive node
at the processing size, as the reference does; the preview is the same rasterisation at the image size.
"""

from typing import get_args

import numpy as np
import torch

from ..e2p_core.errors import InputError
from ..e2p_core.pipeline import PointPrompt
from ..e2p_core.points import CoordSpace, build_point_map, parse_points, to_pixel_coords, warn_negative_points
from .point_picker import PICTURE_UI_KEY, save_picture
from .prediction import E2P_POINT_PROMPT, PointPromptInput

COORD_SPACES = get_args(CoordSpace)  # ("auto", "pixels", "normalized")
CLICK_MODES = ("app", "clicks")


def make_point_prompt(image: torch.Tensor, positive_coords: str, coords_space: str = "auto", mode: str = "app",
                      negative_coords: str = "", mask: torch.Tensor | None = None
                      ) -> tuple[PointPromptInput, torch.Tensor]:
    """(point prompt, preview MASK [1,H,W]) for clicks on ``image`` [B,H,W,C], or for a foreground ``mask``."""
    if image.ndim != 4:
        raise InputError(f"image has shape {list(image.shape)}; expected an IMAGE [B,H,W,C]")
    height, width = image.shape[1:3]
    if mode not in CLICK_MODES:
        raise InputError(f"mode must be one of {CLICK_MODES}, got {mode!r}")
    if negative_coords and negative_coords.strip():
        warn_negative_points(negative_coords)
    if mask is not None:
        prompt = PointPrompt(mask=_single_mask(mask, (height, width)), mode="mask")
    else:
        points_px = to_pixel_coords(parse_points(positive_coords), width, height, coords_space)
        prompt = PointPrompt(points_px=points_px, mode=mode)
    preview = build_point_map(prompt.mode, height, width, points_px=prompt.points_px, mask=prompt.mask)
    return PointPromptInput(prompt, (height, width)), torch.from_numpy(preview)[None]


def validate_point_strings(**texts: str | None) -> bool | str:
    """ComfyUI's check before a run (``VALIDATE_INPUTS``): the point strings typed into the node parse. Strings that
    arrive through a link (KJNodes Points Editor) are unknown until the run (None here) and are checked then."""
    for name, text in texts.items():
        if text is not None:
            try:
                parse_points(text)
            except InputError as error:
                return f"{name}: {error}"
    return True


def _single_mask(mask: torch.Tensor, image_hw: tuple[int, int]) -> np.ndarray:
    frames = mask if mask.ndim == 3 else mask[None]
    if frames.ndim != 3 or frames.shape[0] != 1 or tuple(frames.shape[1:]) != tuple(image_hw):
        raise InputError(f"mask has shape {list(mask.shape)}; expected one MASK [1,H,W] of the image's size "
                         f"{image_hw[1]}x{image_hw[0]} (width x height)")
    return frames[0].detach().cpu().float().numpy()


POSITIVE_TOOLTIP = ("Foreground clicks as the KJNodes Points Editor writes them ('[{\"x\": 512, \"y\": 384}, ...]' or "
                    "'[[x, y], ...]'), in pixels of the image or normalized 0..1.")
COORD_SPACE_TOOLTIP = ("How to read the coordinates: 'auto' = normalized when all lie in 0..1, else pixels; or force "
                       "'pixels' / 'normalized'.")
NEGATIVE_TOOLTIP = "Background clicks: ignored with a warning (the model was trained on positive points only)."
MASK_TOOLTIP = ("A rough foreground mask instead of clicks: 10 points are sampled where it exceeds 0.8, as the "
                "training prompts were made.")


class E2PPointPrompt:
    DESCRIPTION = (
        "Turns foreground clicks (KJNodes Points Editor 'positive_coords') or a foreground mask into the point prompt "
        "of Edit2Perceive matting. As in the official app, disks around the clicks are sampled for 10 points, each a "
        "Gaussian; 'clicks' puts the Gaussians at the clicks instead (not how it was trained). Negative points are "
        "ignored with a warning: the model was trained on positive points only. Click on the picture in the node "
        "to add a point, click a point (or right-click) to remove it; the glow is the point map the model will see."
    )
    CATEGORY = "Edit2Perceive/matting"
    FUNCTION = "run"
    RETURN_TYPES = (E2P_POINT_PROMPT, "MASK")
    RETURN_NAMES = ("point_prompt", "preview")
    OUTPUT_TOOLTIPS = ("The point prompt for 'Edit2Perceive Perceive' (matting).",
                       "The soft point map at the image size, 1 = point (approximately what the model sees).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The image the clicks were made on (gives the pixel scale); connect "
                                               "the same image to the perceive node."}),
                "positive_coords": ("STRING", {"default": "[]", "multiline": True, "tooltip": POSITIVE_TOOLTIP}),
                "coords_space": (list(COORD_SPACES), {"default": "auto", "tooltip": COORD_SPACE_TOOLTIP}),
                "mode": (list(CLICK_MODES), {
                    "default": "app",
                    "tooltip": "'app': sample 10 points in disks around the clicks (the official app, trained); "
                               "'clicks': Gaussians exactly at the clicks."}),
            },
            "optional": {
                "negative_coords": ("STRING", {"default": "", "multiline": True, "tooltip": NEGATIVE_TOOLTIP}),
                "mask": ("MASK", {"tooltip": MASK_TOOLTIP}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, positive_coords=None, negative_coords=None):
        return validate_point_strings(positive_coords=positive_coords, negative_coords=negative_coords)

    def build(self, image, positive_coords, coords_space, mode, negative_coords="", mask=None):
        return make_point_prompt(image, positive_coords, coords_space, mode, negative_coords, mask)

    def run(self, image, positive_coords, coords_space, mode, negative_coords="", mask=None):
        """ComfyUI's entry: :meth:`build`, plus the image as a UI output for the point picker in the browser."""
        result = self.build(image, positive_coords, coords_space, mode, negative_coords, mask)
        return {"ui": {PICTURE_UI_KEY: [save_picture(image)]}, "result": result}
