"""Temporally stable video depth: co-align the per-frame depth predictions of a clip, streaming.

Edit2Perceive predicts each frame on its own, and its depth is affine-invariant in the space it was trained in
(``sqrt`` depth, ``e2p_core.targets``): every frame comes with its own unknown scale and shift, so a video flickers.
This module removes that ambiguity frame by frame, in that space, with the model untouched:

1. Each new frame is fitted (closed form, the symmetric least-squares line of ``e2p_core.alignment``) to the
   already chained frames of a short window before it, where neighbouring frames still see nearly the same depth at
   the same pixel. Pixels the model clipped at 0 or 1 carry no depth, so they are left out of every fit.
2. Keyframes damp the random walk a chain of pairwise fits accumulates: every ``keyframe_interval``-th chained
   frame is kept, and the last ``keyframes`` of them join every fit.
3. Camera motion that looks like an affine change (a push toward a wall) is indistinguishable from the ambiguity
   and a chain absorbs it; the model's own per-frame normalisation is unbiased on average, so every chained frame
   is re-anchored to the mean normalisation of the frames within ``horizon`` of it. The chain removes the flicker,
   the mean removes the drift.
4. One normalisation for the whole clip (:class:`ClipRange`) brings the aligned values back to [0,1], near = 0.

Only the window and the keyframes are kept, at a reduced ``fit_side`` resolution: a clip of any length streams
through :func:`align_depth_frames` with a bounded, small state. ``independent`` (no alignment) is today's
per-frame output.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .alignment import fit_scale_shift_symmetric

TEMPORAL_MODES = ("aligned", "independent")
TRIMMED = 0.2  # share of worst-fitting pixels (moved by the camera) left out of the second fit
MIN_FIT_PIXELS = 16


@dataclass(frozen=True)
class TemporalOptions:
    """How frames are co-aligned. The defaults suit 24-30 fps footage."""

    window: int = 8  # previous aligned frames every new frame is fitted to
    keyframe_interval: int = 12  # every n-th chained frame becomes an anchor
    keyframes: int = 3  # anchors kept and fitted to, besides the window
    horizon: int = 24  # frames on each side over which the model's own normalisation is averaged (0 = chain only)
    fit_side: int = 128  # the fits run on frames area-downsampled to at most this many pixels per side
    clip_margin: float = 1e-3  # values within this of 0 or 1 were clipped by the model

    def __post_init__(self):
        if self.window < 1 or self.keyframe_interval < 1 or self.keyframes < 0 or self.horizon < 0 \
                or self.fit_side < 8:
            raise ValueError(f"invalid temporal options {self}")


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
    and the keyframes at the fit resolution, and ``horizon`` + 1 full-size frames waiting to be emitted.
    """

    def __init__(self, options: TemporalOptions | None = None):
        self.options = options or TemporalOptions()
        self.window: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=self.options.window)
        self.anchors: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=self.options.keyframes)
        self.waiting: deque[tuple[int, torch.Tensor, float, float]] = deque()  # (index, prediction, scale, shift)
        # (1/scale, -shift/scale) of the frames around the next one to emit: the model's own normalisation seen
        # from the chain's frame; their mean is what the chain is re-anchored to.
        self.inverses: deque[tuple[float, float]] = deque(maxlen=2 * self.options.horizon + 1)
        self.frames_seen = 0
        self.frames_emitted = 0

    def push(self, prediction: torch.Tensor) -> list[AlignedFrame]:
        prediction = prediction.float()
        scale, shift = self._chain(prediction)
        self.waiting.append((self.frames_seen, prediction, scale, shift))
        self.frames_seen += 1
        ready = []
        while self.waiting and self.waiting[0][0] + self.options.horizon < self.frames_seen:
            ready.append(self._emit())
        return ready

    def flush(self) -> list[AlignedFrame]:
        return [self._emit() for _ in range(len(self.waiting))]

    def _chain(self, prediction: torch.Tensor) -> tuple[float, float]:
        """1. and 2.: the frame's scale and shift onto the window and the keyframes (the first frame: identity)."""
        small, unclipped = self._fit_view(prediction)  # [h,w], bool [h,w]
        references = list(self.window) + list(self.anchors)
        scale, shift = self._fit(small, unclipped, references) if references else (1.0, 0.0)
        chained = (small * scale + shift, unclipped)
        self.window.append(chained)
        if self.frames_seen % self.options.keyframe_interval == 0:
            self.anchors.append(chained)
        self.inverses.append((1 / scale, -shift / scale))
        return scale, shift

    def _emit(self) -> AlignedFrame:
        """A chained frame re-anchored to the mean normalisation of the model around it: the chain removes the
        frame-to-frame flicker, the mean removes the slow drift any chain of fits accumulates."""
        index, prediction, scale, shift = self.waiting.popleft()
        self.frames_emitted += 1
        if self.options.horizon == 0:  # chain only: the clip stays in the first frame's normalisation
            return AlignedFrame(index, prediction * scale + shift, scale, shift)
        first = max(0, index - self.options.horizon)
        around = list(self.inverses)[first - (self.frames_seen - len(self.inverses)):]
        around = around[:index + self.options.horizon + 1 - first]
        mean_scale = sum(u for u, _ in around) / len(around)
        mean_shift = sum(v for _, v in around) / len(around)
        total_scale, total_shift = mean_scale * scale, mean_scale * shift + mean_shift
        return AlignedFrame(index, prediction * total_scale + total_shift, total_scale, total_shift)

    def _fit_view(self, prediction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The frame at the fit resolution, and where no clipped pixel went into it."""
        margin = self.options.clip_margin
        clipped = ((prediction <= margin) | (prediction >= 1 - margin)).float()  # [1,H,W]
        height, width = prediction.shape[-2:]
        factor = max(1, -(-max(height, width) // self.options.fit_side))  # ceil division
        if factor == 1:
            return prediction[0], clipped[0] == 0
        small = F.avg_pool2d(prediction[None], factor, ceil_mode=True)[0, 0]  # [h,w]
        touched = F.max_pool2d(clipped[None], factor, ceil_mode=True)[0, 0]
        return small, touched == 0

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


def align_depth_frames(predictions: Iterable[torch.Tensor], options: TemporalOptions | None = None
                       ) -> Iterator[AlignedFrame]:
    """Lazily align a stream of per-frame predictions (``depth_affine01`` [1,H,W] each); see the module doc."""
    aligner = TemporalAligner(options)
    for prediction in predictions:
        yield from aligner.push(prediction)
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
                      options: TemporalOptions | None = None) -> torch.Tensor:
    """A whole clip held in memory, ``[T,1,H,W]`` → ``[T,1,H,W]`` in [0,1], near = 0: ``aligned`` co-aligns and
    normalises once for the clip; ``independent`` returns the per-frame predictions as they are."""
    if mode == "independent":
        return depth_affine01
    if mode != "aligned":
        raise ValueError(f"temporal mode must be one of {TEMPORAL_MODES}, got {mode!r}")
    clip_range = ClipRange()
    aligned = torch.empty_like(depth_affine01, dtype=torch.float32)
    for frame in align_depth_frames(depth_affine01, options):
        aligned[frame.index] = frame.depth
        clip_range.update(frame.depth)
    return clip_range.normalize(aligned)
