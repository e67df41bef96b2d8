"""``predict`` on a folder of frames or a video file, and ``--tiles``: the loops around ``perceive``.

Frames stream through chunk by chunk (``--chunk-size``): only one chunk's latents exist at a time, and the temporal
alignment (``e2p_core.video``) keeps only its window, so a clip of any length runs in bounded memory. Aligned depth
waits in a float16 memory-mapped file next to the outputs until the clip's one normalisation is known, then every
frame is written as ``<out>/<frame name>.png`` (or ``.npy``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .cli_outputs import output_view, publish, write_map
from .errors import InputError
from .images import load_image_rgb
from .pipeline import PointPrompt
from .tiling import auto_tiles, perceive_tiled, plan_tiles
from .video import ClipRange, TemporalAligner, TemporalOptions

logger = logging.getLogger("e2p_core")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")


def is_sequence(path: str) -> bool:
    return Path(path).is_dir() or Path(path).suffix.lower() in VIDEO_SUFFIXES


def read_frames(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """(name, uint8 RGB [H,W,3]) of every frame, lazily: a folder's images in name order, or a video's frames."""
    source = Path(path)
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise InputError(f"{path} holds no image ({', '.join(IMAGE_SUFFIXES)})")
        for file in files:
            yield file.stem, load_image_rgb(file)
        return
    try:
        import cv2  # OpenCV reads every common video container; only video input needs it
    except ImportError:
        raise InputError("reading video files needs OpenCV: pip install opencv-python-headless (or give a folder "
                         "of frames)") from None
    capture = cv2.VideoCapture(str(source))
    if not capture.isOpened():
        raise InputError(f"cannot open {path} as a video")
    try:
        index = 0
        while True:
            ok, bgr = capture.read()
            if not ok:
                break
            yield f"frame_{index:06d}", cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            index += 1
    finally:
        capture.release()
    if index == 0:
        raise InputError(f"{path} has no readable frame")


def chunks(frames: Iterator[tuple[str, np.ndarray]], size: int) -> Iterator[list[tuple[str, np.ndarray]]]:
    chunk = []
    for frame in frames:
        chunk.append(frame)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def tile_count(tiles: str | None, image_hw: tuple[int, int], resolution) -> int:
    """``--tiles`` as a number of tiles along the longer side (0 = off)."""
    if not tiles or tiles == "0":
        return 0
    if resolution == "native":
        raise InputError("--tiles needs a processing --resolution (the tiles are cut at it), not native")
    if tiles == "auto":
        return auto_tiles(image_hw, resolution)
    try:
        return int(tiles)
    except ValueError:
        raise InputError(f"--tiles takes a number or 'auto', got {tiles!r}") from None


def predict_frames(run, frames: Iterator[tuple[str, np.ndarray]], task: str, tiles: str | None, resolution,
                   chunk_size: int, *, points: PointPrompt | None = None, point_map: np.ndarray | None = None
                   ) -> Iterator[tuple[str, np.ndarray, torch.Tensor]]:
    """(name, image uint8 [H,W,3], output [C,H,W]) of every frame; ``run(images, points, point_map)`` is ``perceive``
    bound to a model. A matting prompt (``points`` or ``point_map``, in the frame's pixels) belongs to a single
    image."""
    for chunk in chunks(frames, chunk_size):
        names = [name for name, _ in chunk]
        count = tile_count(tiles, chunk[0][1].shape[:2], resolution)
        if count:
            logger.info("%s: %d DiT calls per frame (global + tiles)", names[0],
                        1 + len(plan_tiles(chunk[0][1].shape[:2], count)))
            perceiver = lambda image, points, point_map: run(image, points, point_map).output[0]  # noqa: E731
            outputs = [perceive_tiled(perceiver, image, task, count, points=points, point_map=point_map)
                       for _, image in chunk]
        else:
            outputs = list(run(np.stack([image for _, image in chunk]), points, point_map).output)
        yield from zip(names, (image for _, image in chunk), outputs)


def write_sequence(args, outputs: Iterator[tuple[str, np.ndarray, torch.Tensor]]) -> int:
    """Write every frame into the folder ``args.out``; depth with ``--temporal aligned`` is co-aligned first (frames
    matched through the optical flow of their images)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = ".npy" if args.sequence_format == "npy" else ".png"
    if args.task != "depth" or args.temporal == "independent":
        count = 0
        for name, _, output in outputs:
            _write_frame(out / f"{name}{suffix}", args, output)
            count += 1
        return count
    aligner, clip_range = TemporalAligner(TemporalOptions(window=args.temporal_window,
                                                          horizon=args.temporal_horizon)), ClipRange()
    names, spill = [], None
    spill_path = out / ".e2p_aligned_depth.tmp.npy"

    def keep(aligned_frames):
        nonlocal spill
        for frame in aligned_frames:
            if spill is None:  # grown by doubling: the clip length is not known while streaming
                spill = _grow(spill_path, None, frame.depth.shape[-2:], 64)
            if frame.index >= len(spill):
                spill = _grow(spill_path, spill, frame.depth.shape[-2:], 2 * len(spill))
            spill[frame.index] = frame.depth[0].numpy().astype(np.float16)
            clip_range.update(torch.from_numpy(spill[frame.index].astype(np.float32)))  # the range of what is kept

    try:
        for name, image, output in outputs:
            names.append(name)
            keep(aligner.push(output, image))
        keep(aligner.flush())
        for index, name in enumerate(names):
            depth = clip_range.normalize(torch.from_numpy(spill[index].astype(np.float32))[None])
            _write_frame(out / f"{name}{suffix}", args, depth)
    finally:
        del spill
        spill_path.unlink(missing_ok=True)
    return len(names)


def _grow(path: Path, old, hw, frames: int):
    grown = np.lib.format.open_memmap(f"{path}.new", mode="w+", dtype=np.float16, shape=(frames, *hw))
    if old is not None:
        grown[:len(old)] = old
        del old
    os.replace(f"{path}.new", path)
    return grown


def _write_frame(path: Path, args, output: torch.Tensor) -> None:
    """One frame's user-facing map (as ``predict``'s --out), written atomically."""
    as_npy = path.suffix == ".npy"
    view = output_view(args, output, as_npy)
    publish({str(path): lambda temp: write_map(temp, view, as_npy)})
