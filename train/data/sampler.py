"""Mixing datasets: each batch comes from ONE dataset, drawn by ratio (Marigold's ``MixedBatchSampler``, E2P-SPEC §4.9).

An epoch has as many batches as all datasets together (the sum of their per-dataset batch counts). For each batch a
dataset is drawn with probability ∝ its ratio; its shuffled batch list is refilled (reshuffled) when used up, so small
datasets repeat within an epoch. Unlike the reference, whose leftover batch lists carry over between epochs, each epoch
is a pure function of ``(seed, epoch)``: a resumed run replays it and can start at any batch (:meth:`set_epoch`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import ConcatDataset, Dataset, Sampler

from e2p_core.errors import InputError

# The reference's mixing ratios per task (scripts/train.py), in the dataset kinds' names.
DEFAULT_RATIOS: dict[str, dict[str, float]] = {
    "depth": {"hypersim_depth": 0.9, "vkitti_depth": 0.1},
    "normal": {"hypersim_normal": 0.5, "interiorverse_normal": 0.45, "sintel_normal": 0.05},
    "matting": {"comp1k": 0.22, "distinctions646": 0.22, "am2k": 0.30, "coco_matte": 0.26},  # the paper: 25 % each
}


class MixedBatchSampler(Sampler[list[int]]):
    """Batches of indices into :attr:`dataset`, the ``ConcatDataset`` of ``datasets`` (pass it to the DataLoader
    together with ``batch_sampler=`` this sampler)."""

    def __init__(self, datasets: Sequence[Dataset], ratios: Sequence[float], batch_size: int, seed: int,
                 drop_last: bool = True):
        if len(datasets) != len(ratios) or not datasets:
            raise InputError(f"{len(datasets)} dataset(s) but {len(ratios)} ratio(s); give one ratio per dataset")
        if batch_size < 1:
            raise InputError(f"batch size is {batch_size}; expected at least 1")
        if any(r < 0 for r in ratios) or sum(ratios) <= 0:
            raise InputError(f"mixing ratios {list(ratios)} must be >= 0 with a positive sum")
        self.dataset = ConcatDataset(datasets)
        self.datasets, self.batch_size, self.seed, self.drop_last = list(datasets), batch_size, seed, drop_last
        self.probabilities = torch.tensor(ratios, dtype=torch.float64) / sum(ratios)
        lengths = [len(d) for d in datasets]
        self.offsets = [sum(lengths[:i]) for i in range(len(lengths))]
        self.batch_counts = [n // batch_size if drop_last else -(-n // batch_size) for n in lengths]
        for name, count, ratio in zip((getattr(d, "name", i) for i, d in enumerate(datasets)), self.batch_counts,
                                      ratios):
            if ratio > 0 and count == 0:
                raise InputError(f"dataset {name} has fewer samples than the batch size {batch_size}; it cannot give "
                                 f"a full batch (lower the batch size or give it ratio 0)")
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Iterate epoch ``epoch`` from its batch ``start_batch`` on (resume); also sets the datasets' epoch (call it
        before each epoch's DataLoader iterator is made: persistent workers keep the datasets they started with)."""
        if not 0 <= start_batch <= self.epoch_batches:
            raise InputError(f"start batch {start_batch} is outside the epoch's {self.epoch_batches} batches")
        self.epoch, self.start_batch = epoch, start_batch
        for dataset in self.datasets:
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)

    @property
    def epoch_batches(self) -> int:
        """Batches in a whole epoch."""
        return sum(self.batch_counts)

    def __len__(self) -> int:
        return self.epoch_batches - self.start_batch

    def _shuffled_batches(self, which: int, generator: torch.Generator) -> list[list[int]]:
        order = (torch.randperm(len(self.datasets[which]), generator=generator) + self.offsets[which]).tolist()
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        return batches[: self.batch_counts[which]]

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        pending: list[list[list[int]]] = [[] for _ in self.datasets]
        for position in range(self.epoch_batches):
            which = int(torch.multinomial(self.probabilities, 1, generator=generator))
            if not pending[which]:
                pending[which] = self._shuffled_batches(which, generator)
            batch = pending[which].pop()
            if position >= self.start_batch:
                yield batch
