"""Where a video frame's pixels were in earlier frames: dense optical flow between small grey frames, chained.

The temporal alignment (``e2p_core.video``) fits a frame's depth to earlier frames; matching the same pixel would
compare different surfaces wherever the camera panned or moved sideways. OpenCV's DIS optical flow (Kroeger et al.,
ECCV 2016: coarse-to-fine inverse-search patches plus a variational refinement; fast on a CPU at the small fit
resolution) finds, for every pixel of a new frame, its place in the frame before. A flow is kept only where it is
consistent both ways (the forward flow and the backward flow at its end cancel, Sundaram et al., ECCV 2010): pixels
hidden in one of the two frames, or off its border, fail that check.

Flow is only computed between CONSECUTIVE frames, where the motion is small: at the fit resolution DIS loses a
displacement of a few patch widths (tested: a 8 px pan of a 64 px frame is matched wrongly, and consistently so).
Where a pixel was in an older frame follows by composing the steps (:class:`Track`); a pixel lost once stays lost.

OpenCV is optional for the package (``opencv-python-headless``); without it :func:`flow_available` is False and the
alignment falls back to matching the same pixel.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# Forward-backward check: |forward + backward at its end|² < RELATIVE · (|forward|² + |backward|²) + ABSOLUTE_PX2.
CONSISTENCY_RELATIVE = 0.01
CONSISTENCY_ABSOLUTE_PX2 = 0.5
LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601


def flow_available() -> bool:
    return importlib.util.find_spec("cv2") is not None


def grey_at(image, size_hw: tuple[int, int], pool: int) -> np.ndarray:
    """An RGB frame (uint8 [H,W,3], or float in [0,1] as a ComfyUI IMAGE frame) as uint8 grey [h,w] on the grid of
    the depth it was predicted with: resized to ``size_hw`` (the depth's size) if it differs, then ``pool``×``pool``
    area-averaged as the depth is (``ceil_mode``, so the two grids match pixel for pixel)."""
    rgb = image.detach().cpu() if isinstance(image, torch.Tensor) else torch.from_numpy(np.asarray(image))
    rgb = rgb.float() / 255 if rgb.dtype == torch.uint8 else rgb.float()
    grey = (rgb[..., :3] * torch.tensor(LUMA_WEIGHTS)).sum(-1)[None, None]  # [1,1,H,W]
    if tuple(grey.shape[-2:]) != tuple(size_hw):
        grey = F.interpolate(grey, size=size_hw, mode="bilinear", align_corners=False, antialias=True)
    if pool > 1:
        grey = F.avg_pool2d(grey, pool, ceil_mode=True)
    return (grey[0, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()


@dataclass
class Track:
    """Where the pixels of the newest frame are in one earlier frame: ``where`` float32 [h,w,2] (x = column, y = row
    in the earlier frame), ``found`` bool [h,w] (False once a pixel was lost on the way)."""

    where: np.ndarray
    found: np.ndarray

    @classmethod
    def identity(cls, size_hw: tuple[int, int]) -> "Track":
        rows, cols = np.mgrid[:size_hw[0], :size_hw[1]].astype(np.float32)
        return cls(np.stack([cols, rows], -1), np.ones(size_hw, dtype=bool))

    def sample(self, values: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The earlier frame's ``values`` [h,w] (and bool ``valid``) at the newest frame's pixels. Nearest, not
        bilinear: interpolating would average the earlier frame's noise away, and the symmetric fit that follows
        needs the same noise on both sides (less on one side shrinks the scale at every link of the chain)."""
        height, width = values.shape
        cols = np.rint(self.where[..., 0]).clip(0, width - 1).astype(np.int64)
        rows = np.rint(self.where[..., 1]).clip(0, height - 1).astype(np.int64)
        return values[rows, cols], torch.from_numpy(self.found) & valid[rows, cols]


class FlowMatcher:
    """Follows a new frame's pixels into the frame before it (:meth:`step`) and on into older frames
    (:meth:`extend`)."""

    def __init__(self):
        import cv2  # optional dependency: only a caller that passes images gets here (see flow_available)

        self._cv2 = cv2
        self._dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
        self._dis.setFinestScale(0)  # the fit frames are already small: refine the flow down to their own pixels

    def step(self, grey_new: np.ndarray, grey_before: np.ndarray) -> Track:
        """The new frame's pixels in the frame just before it, where the flow is consistent both ways and stays
        inside that frame."""
        cv2 = self._cv2
        forward = self._dis.calc(grey_new, grey_before, None)  # float32 [h,w,2] (dx, dy): new pixel → before
        backward = self._dis.calc(grey_before, grey_new, None)  # pixel before → new frame
        track = Track.identity(grey_new.shape)
        where = track.where + forward
        backward_at_end = cv2.remap(backward, where[..., 0], where[..., 1], cv2.INTER_LINEAR,
                                    borderMode=cv2.BORDER_REPLICATE)
        mismatch = ((forward + backward_at_end) ** 2).sum(-1)
        magnitude = (forward ** 2).sum(-1) + (backward_at_end ** 2).sum(-1)
        consistent = mismatch < CONSISTENCY_RELATIVE * magnitude + CONSISTENCY_ABSOLUTE_PX2
        height, width = grey_new.shape
        inside = (where[..., 0] >= 0) & (where[..., 0] <= width - 1) & (where[..., 1] >= 0) \
            & (where[..., 1] <= height - 1)
        return Track(where, consistent & inside)

    def extend(self, track: Track, step: Track) -> Track:
        """``track`` (the previous frame's pixels in an earlier frame) followed from the new frame through ``step``
        (the new frame's pixels in the previous one). Bilinear in the positions, and only where all four
        neighbours were still found, so a position is never blended across a pixel already lost."""
        cv2 = self._cv2
        map_x, map_y = step.where[..., 0], step.where[..., 1]
        where = cv2.remap(track.where, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        support = cv2.remap(track.found.astype(np.float32), map_x, map_y, cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        return Track(where, step.found & (support > 0.999))
