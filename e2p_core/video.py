"""Temporally stable video depth: co-align the per-frame depth predictions of a clip, streaming.

Edit2Perceive predicts each frame on its own, and its depth is affine-invariant in the space it was trained in
(``sqrt`` depth, ``e2p_core.targets``): every frame comes with its own unknown scale and shift, so a video flickers.
This module removes that ambiguity frame by frame, in that space, with the model untouched:

1. Each new frame is fitted (closed form, the symmetric least-squares line of ``e2p_core.alignment``) to the
   already chained frames of a short window before it. Given the RGB frames, every earlier frame is first brought
   into the new frame's pixel grid by optical flow (``e2p_core.flow``: OpenCV's DIS flow between consecutive small
   grey frames, forward-backward checked, composed into a track of every new pixel back to each kept frame), so a
   pan or a sideways move compares the same surface point, not the same pixel; pixels hidden on the way or gone
   out of view stay out. Without images (or without OpenCV) frames are matched at the same pixel, which is right
   for a still camera only. Pixels the model clipped at 0 or 1 carry no depth, so they are left out of every fit,
   as are the worst-fitting ``TRIMMED`` of a first fit.
2. Keyframes damp the random walk a chain of pairwise fits accumulates: every ``keyframe_interval``-th chained
   frame is kept, and the last ``keyframes`` of them join every fit.
3. A camera move along the view axis (a push toward a wall) changes sqrt-depth almost affinely, so it is
   indistinguishable from the ambiguity without camera poses, and a chain absorbs it (the wall keeps the depth it
   had). The model's own per-frame normalisation is unbiased on average, so every chained frame is re-anchored to
   the Gaussian-weighted mean normalisation of the frames within ``horizon`` of it (sigma = ``horizon`` / 2). That
   mean is noisy (the per-frame scale varies a lot), so a short horizon adds a slow wobble to a still clip and a
   long one follows a push less: 72 frames (24-30 fps: about 5 s) was the best compromise on the synthetic clips of
   ``tests/test_video.py``. The chain removes the flicker, the mean removes the drift.
4. One normalisation for the whole clip (:class:`ClipRange`) brings the aligned values back to [0,1], near = 0.

Only the window and the keyframes (with their tracks) and the last frame's grey image are kept, at a reduced
``fit_side`` resolution: a clip of any length streams through :func:`align_depth_frames` with a bounded state.
``independent`` (no alignment) is today's per-frame output.
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import repeat

import numpy as np
import torch
import torch.nn.functional as F

from .alignment import fit_scale_shift_symmetric
from .flow import FlowMatcher, Track, flow_available, grey_at

TEMPORAL_MODES = ("aligned", "independent")
TRIMMED = 0.2  # share of worst-fitting pixels (moved by the camera) left out of the second fit
MIN_FIT_PIXELS = 16


@dataclass(frozen=True)
class TemporalOptions:
    """How frames are co-aligned. The defaults suit 24-30 fps footage."""

    window: int = 8  # previous aligned frames every new frame is fitted to
    keyframe_interval: int = 12  # every n-th chained frame becomes an anchor
    keyframes: int = 3  # anchors kept and fitted to, besides the window
    horizon: int = 72  # frames on each side over which the model's own normalisation is averaged (0 = chain only)
    fit_side: int = 128  # the fits run on frames area-downsampled to at most this many pixels per side
    clip_margin: float = 1e-3  # values within this of 0 or 1 were clipped by the model

    def __post_init__(self):
        if self.window < 1 or self.keyframe_interval < 1 or self.keyframes < 0 or self.horizon < 0 \
                or self.fit_side < 8:
            raise ValueError(f"invalid temporal options {self}")


@dataclass
class KeptFrame:
    """A chained frame kept for the fits, at the fit size, with where the newest frame's pixels are in it (None:
    matched at the same pixel)."""

    values: torch.Tensor  # [h,w] chained sqrt-depth
    unclipped: torch.Tensor  # bool [h,w]
    track: Track | None

    def seen_from_newest(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, valid) in the newest frame's pixel grid."""
        if self.track is None:
            return self.values, self.unclipped
        return self.track.sample(self.values, self.unclipped)


@dataclass(frozen=True)
class AlignedFrame:
    """One frame in the clip's common affine frame of sqrt-depth, not yet normalised for the clip."""

    index: int
    depth: torch.Tensor  # float32 [1,H,W]: scale · prediction + shift
    scale: float
    shift: float


class TemporalAligner:
    """Streams a clip's depth predictions (``depth_affine01`` [1,H,W], near = 0) into one affine frame.

    ``push`` takes frame after frame and returns the frames that are ready (each one waits ``horizon`` frames for
    the average around it); ``flush`` returns the rest at the end of the clip. The state is bounded: the fit window
    and the keyframes at the fit resolution (values, unclipped mask, track), the last grey image, and ``horizon`` + 1
    full-size predictions waiting to be emitted.
    """

    def __init__(self, options: TemporalOptions | None = None):
        self.options = options or TemporalOptions()
        self.window: deque[KeptFrame] = deque(maxlen=self.options.window)
        self.anchors: deque[KeptFrame] = deque(maxlen=self.options.keyframes)
        self.matcher: FlowMatcher | None = None  # created with the first image
        self.last_grey: np.ndarray | None = None  # the previous frame's image, grey uint8 [h,w] at the fit size
        self._warned_no_flow = False
        self.waiting: deque[tuple[int, torch.Tensor, float, float]] = deque()  # (index, prediction, scale, shift)
        # (1/scale, -shift/scale) of the frames around the next one to emit: the model's own normalisation seen
        # from the chain's frame; their mean is what the chain is re-anchored to.
        self.inverses: deque[tuple[float, float]] = deque(maxlen=2 * self.options.horizon + 1)
        self.frames_seen = 0
        self.frames_emitted = 0

    def push(self, prediction: torch.Tensor, image=None) -> list[AlignedFrame]:
        """``image``: the RGB frame the prediction was made from (uint8 [H,W,3], or float in [0,1]), optional;
        with it every earlier frame is matched through the optical flow, without it at the same pixel."""
        prediction = prediction.float()
        scale, shift = self._chain(prediction, image)
        self.waiting.append((self.frames_seen, prediction, scale, shift))
        self.frames_seen += 1
        ready = []
        while self.waiting and self.waiting[0][0] + self.options.horizon < self.frames_seen:
            ready.append(self._emit())
        return ready

    def flush(self) -> list[AlignedFrame]:
        return [self._emit() for _ in range(len(self.waiting))]

    def _chain(self, prediction: torch.Tensor, image) -> tuple[float, float]:
        """1. and 2.: the frame's scale and shift onto the window and the keyframes (the first frame: identity)."""
        small, unclipped = (view.cpu() for view in self._fit_view(prediction))  # [h,w], bool [h,w], on the CPU
        grey = self._grey_view(image, prediction.shape[-2:])  # uint8 [h,w] or None
        self._follow(grey)
        references = [kept.seen_from_newest() for kept in (*self.window, *self.anchors)]
        scale, shift = self._fit(small, unclipped, references) if references else (1.0, 0.0)
        chained = KeptFrame(small * scale + shift, unclipped, None if grey is None else Track.identity(grey.shape))
        self.window.append(chained)
        if self.frames_seen % self.options.keyframe_interval == 0:
            self.anchors.append(chained)
        self.inverses.append((1 / scale, -shift / scale))
        return scale, shift

    def _emit(self) -> AlignedFrame:
        """3.: a chained frame re-anchored to the mean normalisation of the model around it: the chain removes the
        frame-to-frame flicker, the mean removes the slow drift any chain of fits accumulates."""
        index, prediction, scale, shift = self.waiting.popleft()
        self.frames_emitted += 1
        if self.options.horizon == 0:  # chain only: the clip stays in the first frame's normalisation
            return AlignedFrame(index, prediction * scale + shift, scale, shift)
        first = max(0, index - self.options.horizon)
        around = list(self.inverses)[first - (self.frames_seen - len(self.inverses)):]
        around = around[:index + self.options.horizon + 1 - first]
        # Gaussian weights (sigma = horizon / 2, cut at the horizon): the model's normalisation is noisy frame to
        # frame, and a smooth window passes less of that noise than a box of the same reach
        weights = [math.exp(-2 * ((first + k - index) / self.options.horizon) ** 2) for k in range(len(around))]
        total = sum(weights)
        mean_scale = sum(w * u for w, (u, _) in zip(weights, around)) / total
        mean_shift = sum(w * v for w, (_, v) in zip(weights, around)) / total
        total_scale, total_shift = mean_scale * scale, mean_scale * shift + mean_shift
        return AlignedFrame(index, prediction * total_scale + total_shift, total_scale, total_shift)

    def _pool_factor(self, size_hw) -> int:
        """The area-downsampling factor that brings a frame to at most ``fit_side`` pixels per side."""
        return max(1, -(-max(size_hw) // self.options.fit_side))  # ceil division

    def _fit_view(self, prediction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The frame at the fit resolution, and where no clipped pixel went into it."""
        margin = self.options.clip_margin
        clipped = ((prediction <= margin) | (prediction >= 1 - margin)).float()  # [1,H,W]
        factor = self._pool_factor(prediction.shape[-2:])
        if factor == 1:
            return prediction[0], clipped[0] == 0
        small = F.avg_pool2d(prediction[None], factor, ceil_mode=True)[0, 0]  # [h,w]
        touched = F.max_pool2d(clipped[None], factor, ceil_mode=True)[0, 0]
        return small, touched == 0

    def _grey_view(self, image, size_hw) -> np.ndarray | None:
        """The frame's image as grey on the fit grid, or None without an image (or without OpenCV to match it)."""
        if image is None:
            return None
        if self.matcher is None:
            if not flow_available():
                if not self._warned_no_flow:
                    warnings.warn("temporal alignment: OpenCV is not installed, so frames are matched at the same "
                                  "pixel, not through optical flow (pip install opencv-python-headless)")
                    self._warned_no_flow = True
                return None
            self.matcher = FlowMatcher()
        return grey_at(image, tuple(size_hw), self._pool_factor(size_hw))

    def _follow(self, grey: np.ndarray | None) -> None:
        """Carry every kept frame's track on to the new frame through the flow from the previous one; without an
        image for both, the tracks end and those frames are matched at the same pixel from now on."""
        kept = {id(frame): frame for frame in (*self.window, *self.anchors)}.values()  # a keyframe is in both
        step = None if grey is None or self.last_grey is None else self.matcher.step(grey, self.last_grey)
        for frame in kept:
            frame.track = None if step is None or frame.track is None else self.matcher.extend(frame.track, step)
        self.last_grey = grey

    @staticmethod
    def _fit(small: torch.Tensor, unclipped: torch.Tensor, references) -> tuple[float, float]:
        """One scale and shift of ``small`` onto all references at once, on pixels unclipped in both.

        Both sides are noisy, so the fit is the symmetric one (ordinary least squares would shrink the scale a little
        at every link of the chain); pixels whose depth changed because the camera moved (occlusion edges) are the
        worst-fitting ``TRIMMED`` of a first fit and are left out of a second one.
        """
        count = len(references)
        prediction = small.expand(count, -1, -1).reshape(1, -1)
        target = torch.stack([values for values, _ in references]).reshape(1, -1)
        valid = (unclipped[None] & torch.stack([mask for _, mask in references])).reshape(1, -1)
        if int(valid.sum()) < MIN_FIT_PIXELS:  # nothing shared: keep the model's own normalisation
            return 1.0, 0.0
        scale, shift = fit_scale_shift_symmetric(prediction, target, valid)
        residual = (prediction * scale + shift - target).abs()
        cutoff = torch.quantile(residual[valid], 1 - TRIMMED)
        scale, shift = fit_scale_shift_symmetric(prediction, target, valid & (residual <= cutoff))
        if float(scale) <= 0:  # a degenerate fit would flip near and far
            return 1.0, 0.0
        return float(scale), float(shift)


def align_depth_frames(predictions: Iterable[torch.Tensor], options: TemporalOptions | None = None,
                       images: Iterable | None = None) -> Iterator[AlignedFrame]:
    """Lazily align a stream of per-frame predictions (``depth_affine01`` [1,H,W] each), with the RGB frames they
    were predicted from (``images``, one per prediction, optional); see the module doc."""
    aligner = TemporalAligner(options)
    for prediction, image in zip(predictions, repeat(None) if images is None else images):
        yield from aligner.push(prediction, image)
    yield from aligner.flush()


class ClipRange:
    """The one normalisation of a clip: the lowest and highest aligned value seen, mapped to 0 and 1."""

    def __init__(self):
        self.low, self.high = float("inf"), float("-inf")

    def update(self, aligned: torch.Tensor) -> None:
        self.low = min(self.low, float(aligned.amin()))
        self.high = max(self.high, float(aligned.amax()))

    def normalize(self, aligned: torch.Tensor) -> torch.Tensor:
        return ((aligned - self.low) / max(self.high - self.low, 1e-6)).clamp(0, 1)


def align_depth_video(depth_affine01: torch.Tensor, mode: str = "aligned",
                      options: TemporalOptions | None = None, images=None) -> torch.Tensor:
    """A whole clip held in memory, ``[T,1,H,W]`` → ``[T,1,H,W]`` in [0,1], near = 0: ``aligned`` co-aligns and
    normalises once for the clip; ``independent`` returns the per-frame predictions as they are. ``images``: the
    clip's RGB frames ``[T,H,W,3]`` (uint8, or float in [0,1] as a ComfyUI IMAGE), to match frames by optical flow."""
    if mode == "independent":
        return depth_affine01
    if mode != "aligned":
        raise ValueError(f"temporal mode must be one of {TEMPORAL_MODES}, got {mode!r}")
    clip_range = ClipRange()
    aligned = torch.empty_like(depth_affine01, dtype=torch.float32)
    if images is not None and len(images) != len(depth_affine01):
        raise ValueError(f"{len(images)} images for {len(depth_affine01)} depth frames")
    for frame in align_depth_frames(depth_affine01, options, images):
        aligned[frame.index] = frame.depth
        clip_range.update(frame.depth)
    return clip_range.normalize(aligned)
