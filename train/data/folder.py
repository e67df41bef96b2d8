"""The plain ``folder`` dataset format, for your own training data.

One folder per kind of file, matched by file name (without extension)::

    <root>/images/<name>.png|.jpg|.jpeg  RGB input (any size; resized to the training H×W, aspect not kept)
    <root>/depth/<name>.npy              depth task: float [H,W] planar depth in METRES; <= 1e-3, NaN or inf = invalid
    <root>/depth/<name>.png                or a uint16 PNG in MILLIMETRES (Hypersim's units); 0 = invalid, max 65.5 m
    <root>/normals/<name>.npy            normal task: float [H,W,3] camera-space normals in the OpenGL frame (+x right,
                                         +y up, +z toward the camera: Hypersim, Blender, Marigold); zero = invalid
    <root>/alpha/<name>.png|.jpg         matting task: 8- or 16-bit grey alpha, white = foreground

Only the folder of the trained task is needed; images without a target are reported and left out. Instead of the scan,
a list file (``list_file``) may name the pairs, one per line, relative to ``<root>``: ``images/a.png depth/a.npy``.

As for the published sets: normals get x negated into the E2P frame (+x left), depth is resized (bicubic) before the
validity mask, alpha is resized bilinearly.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np

from e2p_core.errors import InputError

from .listing import Pair, pair_up
from .readers import depth_validity, read_alpha, read_depth_npy, read_depth_png, read_normals_npy
from .sources import Source

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
TARGETS = {  # task → (folder, accepted target suffixes in the order they are looked for)
    "depth": ("depth", (".npy", ".png")),
    "normal": ("normals", (".npy",)),
    "matting": ("alpha", (".png", ".jpg")),
}
NPY_MIN_DEPTH_M = 1e-3  # the reference's lower validity bound
PNG_MILLIMETRES_PER_METRE = 1000.0
PNG_VALID_M = (1e-3, 65.5)  # as Hypersim: uint16 millimetres end at 65.535 m


def read_folder_depth(path: Path, size_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``.npy`` metres or uint16 ``.png`` millimetres → (depth metres [H,W], valid [H,W])."""
    if path.suffix.lower() == ".png":
        depth_m = read_depth_png(path, size_hw, PNG_MILLIMETRES_PER_METRE)
        return depth_m, depth_validity(depth_m, *PNG_VALID_M)
    depth_m = read_depth_npy(path, size_hw)
    return depth_m, depth_validity(depth_m, NPY_MIN_DEPTH_M, np.inf)


def _scan(root: Path, task: str) -> list[Pair]:
    folder, suffixes = TARGETS[task]
    images = [p for p in (root / "images").glob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
    return pair_up(images, lambda image: [root / folder / (image.stem + s) for s in suffixes], str(root))


def folder_source(task: str) -> Source:
    """The ``folder`` format read for ``task``."""
    if task not in TARGETS:
        raise InputError(f"unknown task {task!r}; expected one of {sorted(TARGETS)}")
    folder, suffixes = TARGETS[task]
    readers = {"depth": read_folder_depth, "normal": read_normals_npy, "matting": read_alpha}
    layout = f"images/<name>.(png|jpg) + {folder}/<name>.({'|'.join(s[1:] for s in suffixes)})"
    return Source(task, partial(_scan, task=task), readers[task], layout)
