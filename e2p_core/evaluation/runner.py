"""Run a model over one benchmark suite and summarise its metrics under an evaluation protocol (``protocols``).

Per sample: predict with ``e2p_core.pipeline.perceive`` (1 step, seed 42, the 768 square squash by default), take the
prediction at the processing size (``perceive`` is asked not to resize it to the input, which would be thrown away),
resize it to the ground truth as the protocol says (E2P: bilinear ``align_corners=True``), score it with
``e2p_core.metrics``, and average over the images, or pool the pixels (normals under FE2E). Unreadable samples are
skipped and reported, and so are the depth samples the E2P script drops (fewer than 100 valid pixels, SILog 0 or
NaN); an error inside the model stops the run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ..backends.base import Denoiser, LatentCodec
from ..errors import InputError
from ..metrics import PooledAngularErrors, angular_error_metrics, matting_metrics, normal_angular_errors
from ..connector import PromptCache
from ..fe2e import perceive_fe2e
from ..pipeline import perceive
from ..points import sample_point_map
from ..prompts import PromptEmbeddings
from .protocols import E2P, Protocol
from .suites import DataRoot, Sample, Suite

logger = logging.getLogger(__name__)

BENCHMARK_POINT_SIGMA_PX = 20.0  # the benchmark's gen_points σ, in ground-truth pixels (E2P-SPEC §2.1)


@dataclass(frozen=True)
class EvaluationSettings:
    """How to run and score; the defaults are those of the official benchmarks (E2P-SPEC §6)."""

    steps: int = 1
    seed: int = 42
    resize: Literal["aligned", "reference"] = "reference"
    resolution: int | Literal["native", "buckets"] | tuple[int, int] = 768  # "buckets": FE2E's size table
    protocol: Protocol = E2P  # how predictions are aligned, scored and summarised
    point_sigma_px: float = BENCHMARK_POINT_SIGMA_PX
    limit: int | None = None  # evaluate only the first N samples


@dataclass(frozen=True)
class Model:
    """A loaded model for one task: what ``perceive`` (or, ``family="fe2e"``, ``perceive_fe2e``) needs."""

    task: str
    denoiser: Denoiser
    codec: LatentCodec
    prompt: PromptEmbeddings | PromptCache  # FE2E: the empty-prompt cache
    family: Literal["e2p", "fe2e"] = "e2p"


@dataclass
class SuiteResult:
    suite: Suite
    metrics: dict[str, float]  # the dataset-level numbers
    per_image: list[tuple[str, dict[str, float]]] = field(default_factory=list)  # (sample name, metrics)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (sample name, why)
    note: str | None = None  # what discovery left out of the root (AM-2k's train/)


def predict_on_ground_truth(model: Model, sample: Sample, settings: EvaluationSettings) -> torch.Tensor:
    """The model's output for ``sample`` on its ground-truth grid: float32 [C,H,W] (zero outside ``sample.region``)."""
    if model.family == "fe2e":
        # One FE2E pass predicts both maps; the suite's task picks one, at the processing size.
        fe2e = perceive_fe2e(model.denoiser, model.codec, sample.image, model.prompt, steps=settings.steps,
                             seed=settings.seed, resize=settings.resize, resolution=settings.resolution)
        maps, geometry = (fe2e.depth_processing if model.task == "depth" else fe2e.normal_processing), fe2e.geometry
        return _on_ground_truth(maps, geometry, model.task, sample, settings)
    point_map = None
    if model.task == "matting":
        # The benchmark's click simulation: 10 seed-42 points where the ground-truth alpha > 0.8, each a Gaussian of
        # σ = 20 px at the ground truth's own resolution; perceive resizes the map with the image.
        point_map = sample_point_map(sample.target, sigma_px=settings.point_sigma_px)[0]
    result = perceive(model.denoiser, model.codec, sample.image, model.task, model.prompt, point_map=point_map,
                      steps=settings.steps, seed=settings.seed, resize=settings.resize, resolution=settings.resolution,
                      restore_output=False)
    return _on_ground_truth(result.postprocessed, result.geometry, model.task, sample, settings)


def _on_ground_truth(maps: torch.Tensor, geometry, task: str, sample: Sample, settings: EvaluationSettings
                     ) -> torch.Tensor:
    """``maps`` [1,C,Hp,Wp] at the processing size -> float32 [C,H,W] on the ground-truth grid, as the protocol says."""
    height, width = geometry.resized_hw
    content = maps[0, :, :height, :width].float().cpu()  # [C,h,w], the padding cropped
    top, left, region_h, region_w = sample.region or (0, 0, *sample.valid.shape)
    resized = settings.protocol.resize(content, (region_h, region_w), task)  # [C,h',w']
    if sample.region is None:
        return resized
    canvas = torch.zeros(resized.shape[0], *sample.valid.shape)  # [C,H,W]
    canvas[:, top:top + region_h, left:left + region_w] = resized
    return canvas


def evaluate_suite(
    model: Model,
    suite: Suite,
    data_root: str | Path,
    list_file: str | Path | None = None,
    settings: EvaluationSettings = EvaluationSettings(),
    on_sample: Callable[[int, int, str], None] | None = None,
) -> SuiteResult:
    """Evaluate ``model`` on ``suite`` read from ``data_root`` (folder or tar); ``on_sample(i, n, name)`` reports
    progress before each sample."""
    if suite.task != model.task:
        raise InputError(f"suite {suite.name} is a {suite.task} benchmark; the model was loaded for {model.task}")
    protocol = settings.protocol
    protocol.check(model.task)
    result = SuiteResult(suite, {})
    pooled = PooledAngularErrors()  # normals, pooled aggregation: every valid pixel of the dataset
    with DataRoot(data_root) as root:
        rows, result.note = suite.find(root, list_file)
        rows = rows[: settings.limit]
        for index, row in enumerate(rows):
            if on_sample is not None:
                on_sample(index, len(rows), row[0])
            try:
                sample = suite.load(root, row, protocol)
            except InputError as error:
                logger.warning("skipping %s: %s", row[0], error)
                result.skipped.append((row[0], str(error)))
                continue
            if model.task == "depth" and sample.valid.sum() < protocol.min_valid_depth_pixels:
                result.skipped.append((sample.name, f"fewer than {protocol.min_valid_depth_pixels} valid depth pixels"))
                continue
            prediction = predict_on_ground_truth(model, sample, settings)
            if model.task == "depth":
                metrics = protocol.depth_metrics(prediction[0], sample.target, sample.valid, suite.name)
                if protocol.drop_zero_silog and (metrics["silog"] == 0 or math.isnan(metrics["silog"])):
                    result.skipped.append((sample.name, "SILog is 0 or NaN (dropped, as the official script does)"))
                    continue
            elif model.task == "normal":
                errors = normal_angular_errors(prediction, sample.target, sample.valid)
                if protocol.normal_aggregation == "pooled":
                    pooled.add(errors)
                metrics = angular_error_metrics(errors)
            else:
                metrics = matting_metrics(prediction[0], sample.target, protocol.conn_component)
            result.per_image.append((sample.name, metrics))
    if not result.per_image:
        raise InputError(f"no {suite.title} sample of {data_root} could be evaluated "
                         f"({len(result.skipped)} skipped, e.g. {result.skipped[:1]})")
    if model.task == "normal" and protocol.normal_aggregation == "pooled":
        result.metrics = pooled.summary()
    else:
        keys = result.per_image[0][1]
        result.metrics = {key: float(np.nanmean([metrics[key] for _, metrics in result.per_image])) for key in keys}
    return result
