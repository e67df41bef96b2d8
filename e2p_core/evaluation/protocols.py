"""Evaluation protocols: how a prediction is brought onto the ground truth and scored.

Two published protocols score the same benchmarks differently, and their numbers are not comparable:

* ``E2P`` (default): the official Edit2Perceive evaluation (E2P-SPEC §6). Depth: least squares in sqrt depth (the
  released model's training space), valid depths ``1e-3 < d < max`` (NYUv2/ScanNet 10 m, KITTI/DIODE 80 m, ETH3D
  99999 m), KITTI scored in the full frame. Normals: per-image metrics averaged over the images. Predictions are
  resized bilinearly with ``align_corners=True``; normals are not renormalised. Matting: whole-image metrics, Conn
  with the most frequent connected label (``e2p_core.metrics.CONN_COMPONENTS``).
* ``FE2E``: the evaluation of AMAP-ML/FE2E (Marigold's depth datasets and DSINE's normal sets, E2P-SPEC §7). Depth:
  least squares in log depth fitted only where the prediction is positive, log depth clipped at 5 before ``exp``
  (``e2p_core.metrics.align_depth_log_fe2e``), Marigold's ranges (below), KITTI scored on the 1216×352 benchmark crop
  with the Eigen crop taken from that crop. Normals: bilinear ``align_corners=False`` resize, renormalised, errors
  pooled over every pixel of the dataset. No matting.

The FE2E depth ranges are Marigold's dataset classes': NYUv2 and ScanNet ``1e-3 < d < 10``, KITTI ``1e-5 < d < 80``,
ETH3D ``1e-5 < d`` (unbounded), DIODE its own mask alone with predictions clipped to ``[0.6, 350]`` m.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..metrics import CONN_COMPONENTS, align_depth_log_fe2e, depth_metrics, metric_depth_metrics
from ..targets import DEPTH_SPACES

E2P_MIN_DEPTH_M = 1e-3
FE2E_NORMAL_MIN_NORM = 1e-9  # FE2E divides the resized normals by their length, floored here


@dataclass(frozen=True)
class DepthRange:
    """Where ground-truth depth counts and where aligned predictions are clipped, in metres."""

    min_m: float
    max_m: float  # math.inf: unbounded
    masks_ground_truth: bool = True  # False: the dataset's own mask alone decides validity (FE2E's DIODE)

    def valid(self, depth_m: np.ndarray) -> np.ndarray:
        """``min < d < max`` (strict, as both protocols), and finite."""
        return np.isfinite(depth_m) & (depth_m > self.min_m) & (depth_m < self.max_m)


@dataclass(frozen=True)
class Protocol:
    """Everything that differs between two ways of scoring the same benchmark files."""

    name: str  # the CLI name
    title: str  # what the report prints
    tasks: tuple[str, ...]
    depth_ranges: Mapping[str, DepthRange]  # by suite name
    depth_space: str = "sqrt"  # E2P alignment space (e2p_core.targets.DEPTH_SPACES) or "fe2e_log"
    align_corners: bool = True  # the bilinear resize of predictions to the ground truth
    renormalise_normals: bool = False
    normal_aggregation: Literal["per_image", "pooled"] = "per_image"
    kitti_eigen_on_crop: bool = False  # FE2E/Marigold: the Eigen crop of the 1216×352 KB crop, scored on the crop
    min_valid_depth_pixels: int = 100  # E2P skips depth samples with fewer valid pixels
    drop_zero_silog: bool = True  # E2P drops samples whose SILog is 0 or NaN
    conn_component: str = "most_frequent_label"  # matting Conn (e2p_core.metrics.CONN_COMPONENTS)
    options: tuple[str, ...] = field(default=())  # what the user changed from the published protocol

    def check(self, task: str) -> None:
        if task not in self.tasks:
            raise InputError(f"the {self.title} protocol has no {task} evaluation (it covers {', '.join(self.tasks)})")

    def depth_range(self, suite_name: str) -> DepthRange:
        return self.depth_ranges[suite_name]

    def resize(self, content: torch.Tensor, size_hw: tuple[int, int], task: str) -> torch.Tensor:
        """A prediction ``[C,h,w]`` (processing size, padding cropped) resized bilinearly to ``size_hw``."""
        resized = F.interpolate(content[None].float(), size=size_hw, mode="bilinear",
                                align_corners=self.align_corners)[0]
        if task == "normal" and self.renormalise_normals:
            resized = resized / resized.norm(dim=0, keepdim=True).clamp_min(FE2E_NORMAL_MIN_NORM)
        return resized

    def depth_metrics(self, prediction: torch.Tensor, depth_m: np.ndarray, valid: np.ndarray,
                      suite_name: str) -> dict[str, float]:
        """The depth metrics of one prediction ``[H,W]`` (affine, near = 0) on the ground-truth grid."""
        depth_range = self.depth_range(suite_name)
        max_m = None if math.isinf(depth_range.max_m) else depth_range.max_m
        if self.depth_space == "fe2e_log":
            aligned = align_depth_log_fe2e(prediction, depth_m, valid, depth_range.min_m, max_m)
            return metric_depth_metrics(aligned, depth_m, valid)
        return depth_metrics(prediction, depth_m, valid, self.depth_space, depth_range.min_m, max_m)

    def describe(self, task: str) -> str:
        """One line for the report: the protocol and what it did for ``task``."""
        if task == "depth":
            how = ("least squares in log depth over positive predictions, log clipped at 5"
                   if self.depth_space == "fe2e_log" else f"least-squares alignment in {self.depth_space} depth space")
        elif task == "normal":
            how = "pixels pooled over each dataset" if self.normal_aggregation == "pooled" else "per-image averages"
            how += ", predictions renormalised" if self.renormalise_normals else ""
        else:
            how = f"Conn with the {self.conn_component.replace('_', ' ')} component"
        resize = f"bilinear align_corners={self.align_corners} resize to the ground truth"
        changed = f" (changed: {', '.join(self.options)})" if self.options else ""
        return f"{self.title} protocol{changed}: {how}, {resize}"


def _ranges(min_m: float, **max_by_suite: float) -> dict[str, DepthRange]:
    return {name: DepthRange(min_m, max_m) for name, max_m in max_by_suite.items()}


E2P = Protocol(
    name="e2p",
    title="Edit2Perceive",
    tasks=("depth", "normal", "matting"),
    depth_ranges=_ranges(E2P_MIN_DEPTH_M, nyuv2=10.0, kitti=80.0, eth3d=99999.0, scannet=10.0, diode=80.0),
)

FE2E = Protocol(
    name="fe2e",
    title="FE2E",
    tasks=("depth", "normal"),
    depth_ranges={
        **_ranges(1e-3, nyuv2=10.0, scannet=10.0),
        **_ranges(1e-5, kitti=80.0, eth3d=math.inf),
        "diode": DepthRange(0.6, 350.0, masks_ground_truth=False),
    },
    depth_space="fe2e_log",
    align_corners=False,
    renormalise_normals=True,
    normal_aggregation="pooled",
    kitti_eigen_on_crop=True,
    min_valid_depth_pixels=1,
    drop_zero_silog=False,
)

PROTOCOLS = {protocol.name: protocol for protocol in (E2P, FE2E)}


def get_protocol(name: str, *, depth_space: str | None = None, normal_aggregation: str | None = None,
                 conn_component: str | None = None) -> Protocol:
    """The named protocol, with the E2P options a user may change (each one is recorded in ``options``)."""
    try:
        protocol = PROTOCOLS[name]
    except KeyError:
        raise InputError(f"no evaluation protocol named {name!r}; known: {sorted(PROTOCOLS)}") from None
    changes = {key: value for key, value in (("depth_space", depth_space), ("normal_aggregation", normal_aggregation),
                                              ("conn_component", conn_component)) if value is not None}
    changes = {key: value for key, value in changes.items() if getattr(protocol, key) != value}
    if not changes:
        return protocol
    if protocol is not E2P:
        raise InputError(f"the {protocol.title} protocol is fixed; --depth-space, --normal-aggregation and "
                         f"--conn-component change the Edit2Perceive protocol only")
    if changes.get("depth_space", "sqrt") not in DEPTH_SPACES:
        raise InputError(f"depth space must be one of {DEPTH_SPACES}")
    if changes.get("conn_component", CONN_COMPONENTS[0]) not in CONN_COMPONENTS:
        raise InputError(f"Conn component must be one of {CONN_COMPONENTS}")
    options = tuple(f"{key.replace('_', ' ')} {value}" for key, value in changes.items())
    return replace(protocol, **changes, options=options)
