"""Writing the command line's output files: every file staged as a temp file and published only once all of them
are complete (so an error leaves nothing behind), and the user-facing maps as PNG or .npy."""

import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .checkpoints import stage_file
from .errors import InputError

logger = logging.getLogger("e2p_core")


def check_output_path(path: str, suffixes: tuple[str, ...], flag: str) -> None:
    if Path(path).suffix.lower() not in suffixes:
        raise InputError(f"{flag} {path}: expected a {' or '.join(suffixes)} file")
    if Path(path).is_dir():
        raise InputError(f"{flag} {path} is a folder; give a file name")


def publish(writers: dict[str, Callable[[str], None]]) -> None:
    """``{final path: write(temp path)}``: stage every file, then rename them all into place."""
    staged = {}
    try:
        for final, write in writers.items():
            staged[final] = stage_file(final, write)
    except BaseException:
        for temp in staged.values():
            temp.unlink(missing_ok=True)
        raise
    for final, temp in staged.items():
        os.replace(temp, final)
    logger.info("wrote %s", ", ".join(staged))


def write_map(path: str, view: np.ndarray, as_npy: bool) -> None:
    """A map in [0,1] ([H,W] gray or [H,W,3] RGB) as PNG, or any float map as float32 ``.npy``.

    PNG: 16-bit gray for depth and alpha (8 bits would band the fine gradations), 8-bit RGB for normal maps (what
    every normal-map consumer reads). ``path`` may be a staged temp name: the format comes from ``as_npy``.
    """
    if as_npy:
        with open(path, "wb") as handle:  # a file object: np.save would append ".npy" to the temp name
            np.save(handle, view.astype(np.float32))
        return
    from PIL import Image

    if view.ndim == 3:
        Image.fromarray(np.round(np.clip(view, 0, 1) * 255).astype(np.uint8)).save(path, format="PNG")
    else:
        Image.fromarray(np.round(np.clip(view, 0, 1) * 65535).astype(np.uint16)).save(path, format="PNG")
