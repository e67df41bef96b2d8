"""The endless, resumable stream of training micro-batches.

Epoch ``e`` of a :class:`~train.data.MixedBatchSampler` is a pure function of ``(seed, e)``, so the stream is fully
determined by one number, the global micro-batch position ``p`` (batches of all processes, counted from the start of
training). Process ``rank`` of ``world`` takes the batches with ``p % world == rank``. A run resumed at optimizer
step ``s`` restarts at ``p = s · accumulation · world``: no sample is skipped or seen twice compared with a run that
was never interrupted. A fresh DataLoader per epoch lets worker processes see the epoch (it seeds the trimaps).
"""

from collections.abc import Iterator

from torch.utils.data import DataLoader, Sampler

from .data import MixedBatchSampler


class _ProcessShare(Sampler[list[int]]):
    """The batches of one epoch from ``first_position`` on that belong to process ``rank``."""

    def __init__(self, sampler: MixedBatchSampler, first_position: int, rank: int, world: int):
        self.sampler, self.first_position, self.rank, self.world = sampler, first_position, rank, world

    def __iter__(self) -> Iterator[list[int]]:
        for position, batch in enumerate(self.sampler, start=self.first_position):
            if position % self.world == self.rank:
                yield batch

    def __len__(self) -> int:
        return sum(1 for p in range(self.first_position, self.first_position + len(self.sampler))
                   if p % self.world == self.rank)


def micro_batches(sampler: MixedBatchSampler, start_position: int, rank: int = 0, world: int = 1,
                  num_workers: int = 0, pin_memory: bool = False) -> Iterator[dict]:
    """Collated batches for this process, from global position ``start_position`` on, epoch after epoch."""
    per_epoch = sampler.epoch_batches
    position = start_position
    while True:
        epoch, offset = divmod(position, per_epoch)
        sampler.set_epoch(epoch, offset)  # before the DataLoader forks its workers: they inherit the epoch
        share = _ProcessShare(sampler, position, rank, world)
        yield from DataLoader(sampler.dataset, batch_sampler=share, num_workers=num_workers, pin_memory=pin_memory)
        position = (epoch + 1) * per_epoch
