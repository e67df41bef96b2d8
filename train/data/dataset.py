"""A training dataset: (image, target) pairs of one source → training samples (the contract in ``train.data``).

Targets are encoded with ``e2p_core.targets`` (depth: p2/p98-normalised ``sqrt``/``log``/``uniform`` depth, near = −1;
normals: unit, E2P frame; alpha: binarised at 0.5 as the paper, or soft as the release). Matting samples also carry the
reference trimap and point map.

A sample whose files cannot be read (missing, truncated, wrong shape, no valid pixel) is skipped: a warning names the
file, the dataset remembers it in :attr:`PerceptionDataset.skipped`, and the next readable sample is returned in its
place, so an epoch never stops on one bad file. ``sample["skipped"]`` counts the entries passed over for that sample
(summed over a batch it counts skips across DataLoader worker processes too). Many unreadable entries in a row mean a
wrong root or format and raise :class:`~e2p_core.errors.InputError`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from e2p_core.errors import InputError
from e2p_core.points import sample_point_map
from e2p_core.targets import DEPTH_SPACES, encode_alpha_target, encode_depth_target, encode_normal_target
from e2p_core.tasks import TASKS as E2P_TASKS

from .folder import folder_source
from .listing import Pair, read_list_file
from .matting import gen_trimap
from .readers import read_rgb
from .sources import SOURCES, Source

logger = logging.getLogger(__name__)

KINDS = (*SOURCES, "folder")
TASKS = tuple(E2P_TASKS)  # ("depth", "normal", "matting")
SAMPLE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, cv2.error)  # what unreadable files raise
MAX_CONSECUTIVE_FAILURES = 32


@dataclass(frozen=True)
class DatasetSpec:
    """One training set: its ``kind`` (see ``KINDS``), ``root`` folder, optional list file and mixing ratio."""

    kind: str
    root: str | Path
    list_file: str | Path | None = None
    ratio: float = 1.0


class PerceptionDataset(Dataset):
    """Samples of one source at the training size ``size_hw`` = (height, width)."""

    def __init__(self, pairs: list[Pair], source: Source, name: str, size_hw: tuple[int, int],
                 depth_space: str = "sqrt", binarize_alpha: bool = True, seed: int = 0):
        self.pairs, self.source, self.name = pairs, source, name
        self.task, self.size_hw = source.task, size_hw
        self.depth_space, self.binarize_alpha, self.seed = depth_space, binarize_alpha, seed
        self.epoch = 0
        self.skipped: dict[Pair, str] = {}  # (image, target) → why that sample was skipped

    def __len__(self) -> int:
        return len(self.pairs)

    def set_epoch(self, epoch: int) -> None:
        """The epoch seeds the random trimap widths, so a resumed run draws the same ones."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict:
        failures = 0
        for offset in range(len(self)):
            position = (index + offset) % len(self)
            pair = self.pairs[position]
            if pair in self.skipped:
                continue  # reported when first met
            try:
                sample = self._load(position)
            except SAMPLE_ERRORS as err:
                self.skipped[pair] = f"{type(err).__name__}: {err}"
                logger.warning("%s: skipping unreadable sample %s (target %s): %s", self.name, *pair,
                               self.skipped[pair])
                failures += 1
                if failures >= MAX_CONSECUTIVE_FAILURES:
                    break
                continue
            sample["skipped"] = offset
            return sample
        (image, target), reason = next(iter(self.skipped.items()))
        raise InputError(f"{self.name}: {len(self.skipped)} unreadable samples and none readable near index {index}, "
                         f"e.g. {image} + {target} ({reason}); check the dataset root and format "
                         f"({self.source.layout})")

    def _load(self, position: int) -> dict:
        image_path, target_path = self.pairs[position]
        sample = {"image": read_rgb(image_path, self.size_hw, crop=self.source.crop)}
        target = self.source.read_target(target_path, self.size_hw)
        if self.task == "depth":
            sample.update(self._depth(*target))
        elif self.task == "normal":
            sample.update(self._normal(target))
        else:
            sample.update(self._matting(target, np.random.default_rng([self.seed, self.epoch, position])))
        sample.update(task=self.task, source=self.name, path=str(image_path))
        return sample

    def _depth(self, depth_m: np.ndarray, valid: np.ndarray) -> dict:
        depth, mask = torch.from_numpy(np.ascontiguousarray(depth_m)), torch.from_numpy(valid)
        encoded = encode_depth_target(depth, mask, self.depth_space)  # a ValueError without any valid pixel
        return {"target": encoded[None].repeat(3, 1, 1), "valid": mask, "depth_m": depth}

    @staticmethod
    def _normal(normals_e2p: torch.Tensor) -> dict:
        unit, valid = encode_normal_target(normals_e2p)
        if not bool(valid.any()):
            raise InputError("normal map has no valid pixel")
        return {"target": unit, "valid": valid}

    def _matting(self, alpha: np.ndarray, rng: np.random.Generator) -> dict:
        target = encode_alpha_target(torch.from_numpy(alpha), binarize=self.binarize_alpha)
        return {
            "target": target[None].repeat(3, 1, 1),
            "valid": torch.ones(alpha.shape, dtype=torch.bool),
            # sigma = 3.9 % of the longer side: the reference's 20 px at its 512² training size, 30 px at 768 as at
            # inference, so the model sees the same relative blob size in training and in use.
            "point_map": torch.from_numpy(sample_point_map(alpha)[0])[None],
            "trimap": torch.from_numpy(gen_trimap(alpha, rng)),
        }


def build_dataset(spec: DatasetSpec, task: str, size_hw: tuple[int, int], depth_space: str = "sqrt",
                  binarize_alpha: bool = True, seed: int = 0) -> PerceptionDataset:
    """The dataset ``spec`` describes, for ``task``, with samples at ``size_hw`` = (height, width).

    ``depth_space``: ``sqrt`` (released), ``log`` (FE2E) or ``uniform``; ``binarize_alpha``: the paper's binary matting
    target (False: the release's soft alpha); ``seed``: the trimap widths' seed.
    """
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; expected one of {TASKS}")
    if spec.kind not in KINDS:
        raise InputError(f"unknown dataset kind {spec.kind!r}; expected one of {KINDS}")
    if depth_space not in DEPTH_SPACES:
        raise InputError(f"unknown depth space {depth_space!r}; expected one of {DEPTH_SPACES}")
    if len(size_hw) != 2 or min(size_hw) < 1:
        raise InputError(f"training size {size_hw} must be (height, width) in pixels")
    source = folder_source(task) if spec.kind == "folder" else SOURCES[spec.kind]
    if source.task != task:
        raise InputError(f"dataset kind {spec.kind!r} is a {source.task} dataset, not {task}")
    root = Path(spec.root)
    if not root.is_dir():
        raise InputError(f"dataset root {root} ({spec.kind}) is not a folder")
    if spec.list_file is None:
        pairs = source.scan(root)
        if not pairs:
            raise InputError(f"found no (image, target) pair under {root}; expected the {spec.kind} layout "
                             f"{source.layout}")
    else:
        pairs = read_list_file(Path(spec.list_file), root, allow_trimap_column=task == "matting")
    return PerceptionDataset(pairs, source, spec.kind, (int(size_hw[0]), int(size_hw[1])), depth_space,
                             binarize_alpha, seed)
