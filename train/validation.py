"""Validation during training: the engine's own ``perceive`` on held-out samples, metrics from ``e2p_core.metrics``.

Predictions go through exactly the inference path (fixed-seed noise, one step at t = 1000), so the numbers are
what users of the exported weights will get.
"""

import numpy as np
import torch

from e2p_core.backends.base import Denoiser, LatentCodec
from e2p_core.metrics import depth_metrics, matting_metrics, normal_metrics
from e2p_core.pipeline import perceive
from e2p_core.prompts import PromptEmbeddings
from e2p_core.tasks import get_task


def _visual(task: str, values: torch.Tensor) -> np.ndarray:
    """[C,H,W] model-convention output -> [H,W,3] float in [0,1] for logging (normals as (n+1)/2)."""
    if task == "normal":
        return ((values.float() + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy()
    return values.float()[:1].repeat(3, 1, 1).clamp(0, 1).permute(1, 2, 0).numpy()


def validate(denoiser: Denoiser, codec: LatentCodec, prompt: PromptEmbeddings, samples: list[dict], task: str,
             depth_space: str) -> tuple[dict[str, float], list[np.ndarray]]:
    """Mean metrics over ``samples`` and one [H, 3W, 3] panel (input | prediction | ground truth) per sample."""
    totals: dict[str, list[float]] = {}
    panels = []
    for sample in samples:
        rgb01 = ((sample["image"].float() + 1) / 2).clamp(0, 1).permute(1, 2, 0)  # [H,W,3]
        point_map = sample["point_map"][0].numpy() if get_task(task).uses_point_map else None
        output = perceive(denoiser, codec, rgb01, task, prompt, point_map=point_map, resolution="native"
                          ).output[0].cpu()  # [C,H,W]
        if task == "depth":
            metrics = depth_metrics(output[0], sample["depth_m"], sample["valid"], space=depth_space)
            truth = (sample["target"][:1] + 1) / 2
        elif task == "normal":
            metrics = normal_metrics(output, sample["target"], sample["valid"])
            truth = sample["target"]
        else:
            truth = (sample["target"][:1] + 1) / 2
            metrics = matting_metrics(output[0], truth[0])
        for key, value in metrics.items():
            totals.setdefault(key, []).append(value)
        panels.append(np.concatenate([rgb01.numpy(), _visual(task, output), _visual(task, truth)], axis=1))
    return {key: float(np.nanmean(values)) for key, values in totals.items()}, panels
