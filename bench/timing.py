"""Timing proxies for the two objects ``e2p_core.pipeline.perceive`` is given, so a benchmark can split a run into
stages without touching the pipeline: VAE encode, DiT, VAE decode, and the rest (pre/post-processing, noise, packing).

On CUDA every stage boundary synchronises the device, which costs a little; end-to-end latencies are therefore
taken from runs without proxies, and the proxies only split the time.
"""

import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

STAGES = ("encode", "dit", "decode")


class StageClock:
    """Wall time per stage name, summed over calls; synchronises CUDA around each stage."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds[name] += time.perf_counter() - start


class TimedDenoiser:
    """A ``Denoiser`` that times every call of the one it wraps as the ``dit`` stage."""

    def __init__(self, inner, clock: StageClock):
        self.inner, self.clock = inner, clock
        self.dtype, self.device = inner.dtype, inner.device

    def __call__(self, *args, **kwargs):
        with self.clock.stage("dit"):
            return self.inner(*args, **kwargs)


class TimedCodec:
    """A ``LatentCodec`` that times ``encode`` and ``decode`` of the one it wraps."""

    def __init__(self, inner, clock: StageClock):
        self.inner, self.clock = inner, clock
        self.dtype, self.device = inner.dtype, inner.device

    def encode(self, pixels):
        with self.clock.stage("encode"):
            return self.inner.encode(pixels)

    def decode(self, latents):
        with self.clock.stage("decode"):
            return self.inner.decode(latents)


def stage_times(run: Callable[[object, object], object], denoiser, codec, repeats: int) -> dict[str, float]:
    """Seconds per stage of the fastest of ``repeats`` runs of ``run(denoiser, codec)``, with ``total`` and
    ``other`` (total minus the three model stages). The fastest, not the median: on a shared machine interference
    only ever adds time, and one run's stages add up to its total."""
    runs = []
    for _ in range(repeats):
        clock = StageClock(denoiser.device)
        clock.sync()
        start = time.perf_counter()
        run(TimedDenoiser(denoiser, clock), TimedCodec(codec, clock))
        clock.sync()
        times = {name: clock.seconds[name] for name in STAGES}
        times["total"] = time.perf_counter() - start
        times["other"] = times["total"] - sum(times[name] for name in STAGES)
        runs.append(times)
    return min(runs, key=lambda times: times["total"])


def latency(run: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    """Median wall seconds of ``run()`` (device synchronised before and after each)."""
    clock = StageClock(device)
    for _ in range(warmup):
        run()
    samples = []
    for _ in range(repeats):
        clock.sync()
        start = time.perf_counter()
        run()
        clock.sync()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)
