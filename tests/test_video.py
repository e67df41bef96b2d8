"""Temporal alignment of video depth (e2p_core.video) on a synthetic clip whose truth is known exactly.

The procedural scene of train_support.synthetic is filmed along a camera path (exact depth, intrinsics, poses, and
the rendered RGB frames the aligner matches by optical flow). A stand-in perceiver returns each frame's true
sqrt-depth, normalised like a training target, plus its error, under a random per-frame scale and shift (compressions
the model's [0,1] range allows), clipped to [0,1]. The error is added BEFORE the per-frame scale and shift: it stands
for the model's own error, which lives in its normalised output and is compressed with it. (Added after, a frame
compressed by s carries an error 1/s times larger once its scale is undone, so even the exact per-frame inverse would
score E[1/s] = 1.28x the noise-only AbsRel.) Predictions are scored as Video Depth Anything does: one per-clip
scale/shift alignment in sqrt-depth space, then per-frame AbsRel and TAE (reprojection with the true poses).

Two references for "what the noise alone gives": ``noise_only``, the issue's words (the stand-in without the
per-frame scale and shift), and ``undone``, the stand-in's own frames with their scale and shift undone exactly (a
perfect alignment). They differ only where values were clipped: ``noise_only`` clips the error at the truth's own
[0,1], which pulls the nearest pixels (those AbsRel weighs most) back toward the truth, a help no alignment of the
compressed frames can have; on a still camera that alone makes a perfect alignment score 1.2-1.3x
``noise_only``.

Two stand-ins, differing in their error:

* ``model``: the error of a real perceiver. Most of it belongs to what the model sees: a deterministic one-step model
  shown nearly the same image in the next frame misjudges a surface the same way, so this part is a smooth random
  field over the scene's surfaces (plane waves of about 0.8 m in world space, std ``SURFACE_ERROR``), carried along
  with them as the camera moves; a small per-frame jitter (std ``JITTER``, every pixel on its own) comes on top. Its
  noise-only AbsRel (about 3 %) is below what the best published zero-shot models reach on NYUv2 (Depth Anything V2:
  4.5 %, Marigold: 5.5 %), so "1.2x the noise alone" is no easier here than for a real model.
* ``ideal``: the jitter alone, a model four times more accurate than any published one. It shows the alignment's own
  floor: a camera push along the view axis is nearly indistinguishable from the per-frame ambiguity (see
  e2p_core.video), so the re-anchoring leaves a residual of about 1 % of the range, which dominates an error this
  small. With a jitter-only model the issue's targets need opposite regimes: a five-fold TAE cut needs a jitter
  below about 1.3 % (the jitter itself counts in TAE and no alignment removes it), while the push's residual stays
  within 1.2x of the noise alone only above about 2 %.
"""

import numpy as np
import pytest
import torch

from e2p_core.alignment import align_scale_shift, fit_scale_shift, fit_scale_shift_symmetric
from e2p_core.metrics import temporal_alignment_error
from e2p_core.targets import depth_from_space, depth_to_space
from e2p_core import video as video_module
from e2p_core.flow import FlowMatcher, Track, grey_at
from e2p_core.video import (
    TemporalAligner,
    TemporalOptions,
    align_depth_frames,
    align_depth_video,
)
from train_support.synthetic import synthetic_video

SIZE_HW = (36, 48)
JITTER = 0.01  # per frame and pixel, of the [0,1] range
SURFACE_ERROR = 0.03  # of the [0,1] range, tied to the scene's surfaces
SURFACE_WAVELENGTH_M = 0.8
MAX_COMPRESSION = 0.4  # per-frame scale in [0.6, 1], the shift keeps the content inside [0,1]


def world_points(video) -> np.ndarray:
    """Every pixel's scene point in world coordinates (metres), float64 [T,H,W,3]."""
    depth = video["depth_m"].astype(np.float64)
    intrinsics, poses = video["intrinsics"], video["world_from_camera"]
    rows, cols = np.mgrid[:depth.shape[1], :depth.shape[2]]
    rays = np.stack([(cols - intrinsics[0, 2]) / intrinsics[0, 0], (rows - intrinsics[1, 2]) / intrinsics[1, 1],
                     np.ones(rows.shape)], -1)
    camera = depth[..., None] * rays
    return np.einsum("tij,thwj->thwi", poses[:, :3, :3], camera) + poses[:, None, None, :3, 3]


def surface_field(points: np.ndarray, rng: np.random.Generator, waves: int = 8) -> torch.Tensor:
    """A smooth random field of unit std over world space (``waves`` plane waves, random directions and phases,
    wavelengths within 0.7-1.4x ``SURFACE_WAVELENGTH_M``), at ``points`` [...,3] → [...]."""
    directions = rng.normal(size=(waves, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    wavenumbers = 2 * np.pi / (SURFACE_WAVELENGTH_M * rng.uniform(0.7, 1.4, waves))
    phases = rng.uniform(0, 2 * np.pi, waves)
    waves_at_points = np.cos(points @ (directions * wavenumbers[:, None]).T + phases)
    return torch.from_numpy(np.sqrt(2 / waves) * waves_at_points.sum(-1))


def stand_in(target01: torch.Tensor, error: torch.Tensor, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """The stand-in's predictions [T,1,H,W], clipped to [0,1]: ``independent`` (truth + error under a random
    per-frame scale and shift), ``noise_only`` (truth + error: the stand-in without the per-frame scale and shift)
    and ``undone`` (``independent`` with its per-frame scale and shift undone exactly: what a perfect alignment would
    give, clipped where ``independent`` was)."""
    scale = rng.uniform(1 - MAX_COMPRESSION, 1, len(target01))
    shift = rng.uniform(-(1 - scale) / 2, (1 - scale) / 2)
    scale, shift = (torch.from_numpy(values)[:, None, None] for values in (scale, shift))
    independent = (scale * (target01 + error - 0.5) + 0.5 + shift).clamp(0, 1).float()
    return {"independent": independent[:, None],
            "noise_only": (target01 + error).clamp(0, 1).float()[:, None],
            "undone": ((independent.double() - 0.5 - shift) / scale + 0.5)[:, None]}


@pytest.fixture(scope="module")
def clip():
    video = synthetic_video(SIZE_HW, 300, seed=3, with_images=True)  # DIS flow still works at 48x36
    sqrt_depth = depth_to_space(torch.from_numpy(video["depth_m"]).double())  # [T,H,W]
    low, high = np.percentile(sqrt_depth.numpy(), [2, 98])
    target01 = (sqrt_depth - low) / (high - low)  # the clip's true normalisation: near = 0
    rng = np.random.default_rng(0)
    jitter = torch.from_numpy(rng.normal(0, JITTER, target01.shape))
    surface = SURFACE_ERROR * surface_field(world_points(video), rng)
    return {
        **video,
        "sqrt_depth": sqrt_depth,
        "model": stand_in(target01, surface + jitter, rng),
        "ideal": stand_in(target01, jitter, rng),
    }


def clip_scores(clip, prediction: torch.Tensor, frames: slice = slice(None)) -> tuple[float, float, np.ndarray]:
    """(mean per-frame AbsRel, TAE in %, per-frame AbsRel) after ONE scale/shift for the whole clip in sqrt space."""
    prediction = prediction[frames, 0].double()
    truth = clip["sqrt_depth"][frames]
    aligned = align_scale_shift(prediction.reshape(1, -1), truth.reshape(1, -1))[0].reshape(truth.shape)
    depth = depth_from_space(aligned).clamp_min(1e-3)
    true_depth = torch.from_numpy(clip["depth_m"][frames]).double()
    abs_rel = ((depth - true_depth).abs() / true_depth).mean(dim=(1, 2)).numpy()
    tae = temporal_alignment_error(depth, clip["intrinsics"], clip["world_from_camera"][frames])
    return float(abs_rel.mean()), tae, abs_rel


def test_tae_sees_the_true_motion(clip):
    every_tenth = slice(0, 100, 10)  # far apart views, so a wrong pose shows
    truth = torch.from_numpy(clip["depth_m"][every_tenth]).double()
    poses = clip["world_from_camera"][every_tenth]
    exact = temporal_alignment_error(truth, clip["intrinsics"], poses)
    still = temporal_alignment_error(truth, clip["intrinsics"], np.repeat(poses[:1], len(poses), axis=0))
    assert still > 2 * exact, (exact, still)  # what is left of `exact` is disocclusions and rounding


def test_the_surface_error_moves_with_the_scene(clip):
    """The same scene point gets the same error in every frame: the field is a function of world position."""
    points = world_points(clip)
    field = surface_field(points, np.random.default_rng(5))
    assert 0.8 < float(field.std()) < 1.2
    moved = surface_field(points + np.array([0.0, 0.0, 0.05]), np.random.default_rng(5))
    assert 0.02 < float((moved - field).abs().mean()) < 0.5  # smooth: 5 cm changes it a little
    a, b = points[0, 10, 10], points[0, 20, 30]
    torch.testing.assert_close(surface_field(np.stack([a, b]), np.random.default_rng(5)),
                               field[0, [10, 20], [10, 30]])
    # world_points follows the scene: frame 0's points, seen by frame 100's camera, are where frame 100 sees them, to
    # the rounding to its nearest pixel (half a pixel's footprint: 0.48 here; with the pose 2 frames off, 1.28)
    intrinsics, camera_from_world = clip["intrinsics"], np.linalg.inv(clip["world_from_camera"][100])
    start_points = points[0, 4:-4, 4:-4].reshape(-1, 3)
    seen = start_points @ camera_from_world[:3, :3].T + camera_from_world[:3, 3]
    pixel = seen @ intrinsics.T
    cols, rows = (np.rint(pixel[:, k] / pixel[:, 2]).astype(int) for k in (0, 1))
    inside = (cols >= 0) & (cols < SIZE_HW[1]) & (rows >= 0) & (rows < SIZE_HW[0])
    distance_m = np.linalg.norm(points[100, rows[inside], cols[inside]] - start_points[inside], axis=-1)
    footprint_m = seen[inside, 2] / intrinsics[0, 0]
    assert inside.mean() > 0.5 and np.median(distance_m / footprint_m) < 0.6


def test_aligned_clip_cuts_flicker_five_fold_and_stays_near_the_noise(clip):
    frames = slice(0, 120)
    model = clip["model"]
    independent = model["independent"][frames]
    aligned = align_depth_video(independent, "aligned", images=clip["image"][frames])
    abs_rel_noise, _, _ = clip_scores(clip, model["noise_only"][frames], frames)
    abs_rel_undone, tae_undone, _ = clip_scores(clip, model["undone"][frames], frames)
    abs_rel_independent, tae_independent, _ = clip_scores(clip, independent, frames)
    abs_rel_aligned, tae_aligned, _ = clip_scores(clip, aligned, frames)
    assert 0.025 < abs_rel_noise < 0.045  # a model as good as the best published ones, or better
    assert tae_independent >= 5 * tae_aligned, (tae_independent, tae_aligned, tae_undone)
    # the five-fold cut is bounded by the error's own TAE (a perfect alignment: 6.0x here); the alignment gets close
    assert tae_aligned <= 1.1 * tae_undone, (tae_aligned, tae_undone)
    assert abs_rel_aligned <= 1.2 * abs_rel_noise, (abs_rel_aligned, abs_rel_noise)
    assert abs_rel_aligned <= 1.15 * abs_rel_undone, (abs_rel_aligned, abs_rel_undone)  # what the alignment adds
    assert abs_rel_aligned < abs_rel_independent / 3


def test_a_300_frame_clip_does_not_drift(clip):
    aligned = align_depth_video(clip["model"]["independent"], "aligned", images=clip["image"])
    _, _, per_frame = clip_scores(clip, aligned)
    assert per_frame[-30:].mean() <= 1.5 * per_frame[:30].mean(), (per_frame[:30].mean(), per_frame[-30:].mean())


def test_on_an_ideal_model_the_alignment_floor_shows(clip):
    """The jitter-only stand-in: the flicker goes as completely as with the model's error, but what the alignment
    leaves (the push the chain cannot tell from the ambiguity, the re-anchoring's wobble: about 1 % of the range)
    is 1.4-1.9x an error this small over six draws of the stand-in (1.59x on this one)."""
    frames = slice(0, 120)
    ideal = clip["ideal"]
    independent = ideal["independent"][frames]
    abs_rel_undone, tae_undone, _ = clip_scores(clip, ideal["undone"][frames], frames)
    aligned = align_depth_video(independent, "aligned", images=clip["image"][frames])
    abs_rel_aligned, tae_aligned, _ = clip_scores(clip, aligned, frames)
    assert abs_rel_undone < 0.015
    assert tae_aligned <= 1.1 * tae_undone, (tae_aligned, tae_undone)
    assert abs_rel_aligned <= 2 * abs_rel_undone, (abs_rel_aligned, abs_rel_undone)


def panning_clip(count: int, step_px: int, size_hw=(48, 64)):
    """A camera panning over a textured, sloped wall: (image uint8 [H,W,3], true depth-like values [1,H,W]) per
    frame, frame i seeing the canvas from column i * step_px (new pixel (r, c) was (r, c + step_px) a frame ago)."""
    height, width = size_hw
    rng = np.random.default_rng(0)
    texture = torch.from_numpy(rng.random((1, 1, height // 4, (width + count * step_px) // 4)))
    canvas = torch.nn.functional.interpolate(texture, scale_factor=4, mode="bicubic")[0, 0].clamp(0, 1)
    slope = torch.linspace(0.1, 0.9, canvas.shape[1]).expand(height, -1) \
        + torch.linspace(0, 0.05, height)[:, None]  # depth changes across the pan
    frames = []
    for index in range(count):
        columns = slice(index * step_px, index * step_px + width)
        image = (canvas[:, columns, None].expand(-1, -1, 3) * 255).round().to(torch.uint8).numpy()
        frames.append((image, slope[None, :, columns].float()))
    return frames


def test_flow_tracks_pixels_through_a_pan_and_drops_what_left_the_view():
    """Step by step (3 px a frame), the newest frame's pixels are followed 12 px back into the first frame, further
    than DIS matches two frames directly at this size; columns that entered the view on the way are lost."""
    frames = panning_clip(5, 3)
    greys = [grey_at(image, (48, 64), 1) for image, _ in frames]
    matcher = FlowMatcher()
    track = Track.identity((48, 64))  # the first frame in itself
    for before, new in zip(greys, greys[1:]):
        track = matcher.extend(track, matcher.step(new, before))
    first_values = frames[0][1][0]
    values, seen = track.sample(first_values, torch.ones(48, 64, dtype=torch.bool))
    assert not seen[:, -12:].any()
    assert seen[4:-4, 4:-16].float().mean() > 0.9
    torch.testing.assert_close(values[seen], frames[-1][1][0][seen], atol=0.01, rtol=0)


def test_images_let_the_chain_follow_a_pan():
    """A pan changes the depth at every pixel: with the images the chain (horizon 0) still recovers the true values;
    matched at the same pixel, it fits the pan into the scale and shift."""
    frames = panning_clip(12, 2)
    rng = np.random.default_rng(1)
    affine = [(1.0, 0.0)] + [(rng.uniform(0.6, 1), rng.uniform(-0.1, 0.1)) for _ in frames[1:]]
    options = TemporalOptions(horizon=0, fit_side=64)
    errors = {}
    for matching in ("flow", "same pixel"):
        aligner = TemporalAligner(options)
        chained = [aligned for (image, truth), (scale, shift) in zip(frames, affine)
                   for aligned in aligner.push(truth * scale + shift, image if matching == "flow" else None)]
        errors[matching] = max(float((frame.depth - truth).abs().mean()) for frame, (_, truth) in zip(chained, frames))
    assert errors["flow"] < 0.01 and errors["same pixel"] > 5 * errors["flow"], errors


def test_without_opencv_frames_are_matched_at_the_same_pixel(monkeypatch):
    frames = panning_clip(4, 2)
    monkeypatch.setattr(video_module, "flow_available", lambda: False)
    aligner, same_pixel = TemporalAligner(TemporalOptions(horizon=0)), TemporalAligner(TemporalOptions(horizon=0))
    with pytest.warns(UserWarning, match="OpenCV"):
        with_images = [f.depth for image, truth in frames for f in aligner.push(truth * 0.8, image)]
    without = [f.depth for _, truth in frames for f in same_pixel.push(truth * 0.8)]
    for a, b in zip(with_images, without):
        torch.testing.assert_close(a, b)


def test_independent_keeps_the_per_frame_output():
    frames = torch.rand(5, 1, 8, 8)
    assert align_depth_video(frames, "independent") is frames


def test_aligned_output_is_one_normalisation_for_the_clip_in_0_1():
    frames = torch.rand(6, 1, 16, 16) * 0.5 + 0.2
    aligned = align_depth_video(frames, "aligned")
    assert aligned.shape == frames.shape and aligned.min() == 0 and aligned.max() == 1


def test_streaming_holds_a_bounded_number_of_frames():
    """A long clip streams through: the aligner keeps the window and the keyframes (and where the newest frame's
    pixels are in them) at the fit size, the last image in grey at the fit size, and only ``horizon`` + 1 full-size
    frames, and frames come out in order, each once."""
    options = TemporalOptions(window=4, keyframes=2, horizon=5, fit_side=16)
    alive = []

    def frames():
        for index in range(200):
            image = torch.rand(64, 64, 3)  # a ComfyUI IMAGE frame
            yield torch.full((1, 64, 64), 0.5) + 0.1 * image[None, :, :, 0], image
            alive.append(len(aligner.waiting))

    aligner = TemporalAligner(options)
    emitted = []
    for frame, image in frames():
        emitted.extend(f.index for f in aligner.push(frame, image))
    emitted.extend(f.index for f in aligner.flush())
    assert emitted == list(range(200))
    assert max(alive) <= options.horizon + 1
    assert len(aligner.window) <= 4 and len(aligner.anchors) <= 2
    kept = (*aligner.window, *aligner.anchors)
    assert max(max(frame.values.shape[-1], frame.track.where.shape[-2]) for frame in kept) <= 16
    assert aligner.last_grey.shape[-1] <= 16
    # the generator form is lazy: the first aligned frame exists before the last input was read
    consumed = []
    stream = align_depth_frames((consumed.append(i) or torch.rand(1, 8, 8) for i in range(50)), options)
    next(stream)
    assert len(consumed) <= options.horizon + 1


def test_horizon_0_is_the_chain_alone():
    """Without re-anchoring, every frame is brought into the first frame's normalisation (a frame's own mean would
    cancel its fit and give back the independent output)."""
    truth = torch.linspace(0.1, 0.9, 64).expand(1, 32, 64).clone()
    scales_shifts = [(1.0, 0.0), (0.7, 0.1), (0.8, 0.05), (0.6, 0.2)]
    frames = [truth * scale + shift for scale, shift in scales_shifts]
    aligner = TemporalAligner(TemporalOptions(horizon=0, fit_side=64))
    chained = [aligned for frame in frames for aligned in aligner.push(frame)]
    assert [frame.index for frame in chained] == [0, 1, 2, 3]
    for frame in chained:
        torch.testing.assert_close(frame.depth, truth, atol=1e-4, rtol=0)


def test_clipped_pixels_stay_out_of_the_fit():
    """A frame whose far half is clipped at 1 still gets the scale and shift of its unclipped pixels."""
    truth = torch.linspace(0.1, 0.9, 64).expand(1, 32, 64).clone()
    aligner = TemporalAligner(TemporalOptions(horizon=0, fit_side=64))
    (first,) = aligner.push(truth)  # horizon 0: emitted at once
    assert first.index == 0
    distorted = (truth * 1.6 - 0.1).clamp(0, 1)  # clips the far side
    unclipped = distorted < 1
    scale, shift = aligner._fit(*aligner._fit_view(distorted), [kept.seen_from_newest() for kept in aligner.window])
    torch.testing.assert_close(distorted[unclipped] * scale + shift, truth[unclipped], atol=1e-4, rtol=0)


def test_symmetric_fit_does_not_shrink_with_noise_on_both_sides():
    rng = torch.Generator().manual_seed(0)
    signal = torch.rand(1, 20000, generator=rng)
    a = signal + 0.1 * torch.randn(1, 20000, generator=rng)
    b = 2 * signal + 1 + 0.2 * torch.randn(1, 20000, generator=rng)
    least_squares, _ = fit_scale_shift(a, b)
    symmetric, shift = fit_scale_shift_symmetric(a, b)
    assert float(least_squares) < 1.9  # diluted by the noise on a
    assert abs(float(symmetric) - 2) < 0.03 and abs(float(shift) - 1) < 0.03
