"""The pack's own socket types: what the perceive node produces and what the point prompt node hands it."""

from dataclasses import dataclass

import torch

from ..e2p_core.errors import InputError
from ..e2p_core.pipeline import PointPrompt

E2P_PREDICTION = "E2P_PREDICTION"
E2P_POINT_PROMPT = "E2P_POINT_PROMPT"
E2P_ENCODED_IMAGE = "E2P_ENCODED_IMAGE"  # an e2p_core.pipeline.EncodedImage


@dataclass(frozen=True)
class Prediction:
    """One perceive run, batch-first, on ComfyUI's intermediate device.

    ``output`` is in the reference conventions of ``e2p_core.pipeline``: ``depth_affine01`` [B,1,H,W] (near = 0),
    ``normals_e2p`` [B,3,H,W] (unit, +x left, +y up, +z toward the camera) or ``alpha`` [B,1,H,W] (1 = foreground),
    at exactly the input H x W.
    """

    task: str
    output: torch.Tensor  # float32 [B,C,H,W]
    images: torch.Tensor  # IMAGE [B,H,W,C] in [0,1]: the frames it was predicted from (for the matte's foreground)

    def expect(self, task: str) -> None:
        if self.task != task:
            raise InputError(f"this output node takes a {task} prediction, but the prediction is {self.task}; "
                             f"check the task of the conditioning")


@dataclass(frozen=True)
class PointPromptInput:
    """A matting point prompt plus the size (height, width) of the image its clicks or mask refer to."""

    prompt: PointPrompt
    image_hw: tuple[int, int]
