"""Writing the command line's output files: every file staged as a temp file and published only once all of them
are complete (so an error leaves nothing behind), and the user-facing maps as PNG or .npy."""

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from .checkpoints import stage_file
from .conventions import depth_hint, normals_to_convention, normals_to_rgb01
from .errors import InputError
from .pipeline import Perception

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


def output_writers(args, result: Perception) -> dict:
    """``{path: write(temp path)}`` of --out (and --raw), for ``publish``."""
    writers = {args.out: lambda tmp: _save_view(tmp, args, result)}
    if args.raw:
        # The algorithm's stages, all on the processing grid like the reference's own tensors.
        raw = {"velocity": result.velocity, "latent": result.latent, "decoded": result.decoded,
               "output": result.postprocessed}
        if result.point_map is not None:
            raw["point_map"] = result.point_map
        raw = {key: value.detach().cpu().contiguous() for key, value in raw.items()}
        writers[args.raw] = lambda tmp: save_file(raw, tmp, metadata=_raw_metadata(args))
    return writers


def _raw_metadata(args) -> dict[str, str]:
    keys = ("task", "steps", "seed", "resize", "resolution", "dtype", "time_embedding")
    return {"e2p.args": json.dumps({key: getattr(args, key) for key in keys})}


def _save_view(path: str, args, result: Perception) -> None:
    """The user-facing map: depth with the chosen polarity, normals in the chosen convention, or alpha.

    ``path`` is the staged temp file; the format comes from the final name ``args.out``.
    """
    as_npy = args.out.lower().endswith(".npy")
    write_map(path, output_view(args, result.output[0], as_npy), as_npy)


def output_view(args, output: torch.Tensor, as_npy: bool) -> np.ndarray:
    """One frame's output [C,H,W] as the map --out holds: [H,W] depth or alpha, [H,W,3] normals."""
    if args.task == "depth":
        return depth_hint(output, args.depth_polarity)[0].numpy()  # [H,W]
    if args.task == "normal":
        normals = normals_to_convention(output[None], args.normal_convention)[0]
        return (normals if as_npy else normals_to_rgb01(normals)).permute(1, 2, 0).numpy()
    return output[0].numpy()
