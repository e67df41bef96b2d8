"""Evaluation metrics of the three tasks, shared by the benchmark runner and training-time validation.

Each function scores ONE image and returns plain floats; averaging over a dataset is the caller's business (the
benchmarks average per-image values, E2P-SPEC §6). Inputs may be torch tensors or numpy arrays; everything is computed
in float64 on the CPU.

* Depth (§6.1): the affine-invariant prediction is least-squares aligned to the ground truth in a depth *space*, mapped
  back to metres, clipped to the valid range (:func:`align_depth`, E2P; :func:`align_depth_log_fe2e`, FE2E), and
  scored with the usual AbsRel, δ1..δ3, RMSE, SqRel, RMSE-log, log10 and SILog (:func:`metric_depth_metrics`).
* Normals (§6.2): the angle between predicted and ground-truth vectors, in degrees, summarised per image
  (:func:`normal_metrics`, E2P) or over a whole dataset by :class:`PooledAngularErrors` (FE2E), which keeps a
  histogram instead of every pixel's error.
* Matting (§6.3): MSE, MAD, SAD, Grad and Conn over the whole image with the conventional scalings of the Deep Image
  Matting evaluation (MSE and MAD per pixel, SAD / Grad / Conn summed and divided by 1000). Conn follows the official
  Edit2Perceive evaluation by default; the dataset owners' definition is an option (``CONN_COMPONENTS``).
"""

from __future__ import annotations

import math

import numpy as np
import scipy.ndimage
import torch

from .alignment import align_scale_shift
from .filters import gaussian_gradient_magnitude
from .targets import depth_from_space, depth_to_space

DEPTH_METRICS = ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog", "delta1", "delta2", "delta3")
NORMAL_THRESHOLDS_DEG = (5.0, 7.5, 11.25, 22.5, 30.0)
NORMAL_METRICS = ("mean", "median", "rmse", *(f"below_{t:g}".replace(".", "_") for t in NORMAL_THRESHOLDS_DEG))
MATTING_METRICS = ("mse", "mad", "sad", "grad", "conn")

DELTA_BASE = 1.25
MATTING_SUM_SCALE = 1000.0  # SAD, Grad and Conn are reported in thousands, as in every matting paper
CONN_STEP = 0.1
CONN_MIN_DISTANCE = 0.15  # the DIM connectivity ignores distances to the threshold level below this
FE2E_MAX_LOG_DEPTH = 5.0  # FE2E clips the aligned log depth here before exp
FE2E_MIN_DEPTH_M = 1e-6  # and every aligned depth to at least this, "so that d > 0 for evaluation"
POOLED_BIN_DEG = 1e-3  # histogram bin of the pooled median: its error is at most half of this


def _float64(values) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().double()
    return torch.as_tensor(np.asarray(values, dtype=np.float64))


def _mask(values) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().bool()
    return torch.as_tensor(np.asarray(values, dtype=bool))


# ---------------------------------------------------------------------------------------------------------- depth


def align_depth(
    prediction, depth_m, valid, space: str = "sqrt", min_depth: float = 1e-3, max_depth: float | None = None
) -> torch.Tensor:
    """The prediction ``[H,W]`` (affine-invariant, e.g. ``depth_affine01``) as metric depth ``[H,W]``, float64.

    ``s·prediction + t ≈ depth_to_space(depth_m, space)`` is fitted by least squares over ``valid``, mapped back with
    ``depth_from_space`` and clipped to ``[min_depth, max_depth]``. The default ``space="sqrt"`` is the official
    protocol for the released model, which was trained on sqrt depth: align ``sqrt(depth + 1e-6)``, then square. The
    official script picks the space from substrings of the checkpoint filename, so the README command
    (``depth.safetensors``) silently aligns in linear depth: that is ``space="uniform"``. FE2E's protocol is not
    ``"log"`` but :func:`align_depth_log_fe2e`.
    """
    prediction, depth_m, valid = _float64(prediction), _float64(depth_m), _mask(valid)
    target = depth_to_space(depth_m, space)
    aligned = align_scale_shift(prediction[None], target[None], valid[None])[0]
    return depth_from_space(aligned, space).clamp(min_depth, max_depth)


def align_depth_log_fe2e(
    prediction, depth_m, valid, min_depth: float = 1e-3, max_depth: float | None = None
) -> torch.Tensor:
    """FE2E's log-space alignment (``--norm_type ln`` of its evaluation): the prediction ``[H,W]`` as metric depth.

    ``s·prediction + t ≈ ln(depth)`` is fitted by least squares only where ``valid``, the ground truth is positive
    AND the prediction is positive; every pixel is then mapped by the fit, clipped at ``ln d ≤ 5`` (148 m) before
    ``exp``, clipped to ``[min_depth, max_depth]`` and finally to ``≥ 1e-6``. Unlike ``align_depth(space="log")``
    there is no ``+1e-6`` inside the log, and the fit ignores pixels the model put at or below 0.
    """
    prediction, depth_m, valid = _float64(prediction), _float64(depth_m), _mask(valid)
    positive = depth_m > 0
    log_depth = torch.where(positive, torch.log(torch.where(positive, depth_m, torch.ones_like(depth_m))), 0.0)
    fitted = valid & positive & (prediction > 0)
    aligned_log = align_scale_shift(prediction[None], log_depth[None], fitted[None])[0]
    aligned = torch.exp(aligned_log.clamp(max=FE2E_MAX_LOG_DEPTH)).clamp(min_depth, max_depth)
    return aligned.clamp_min(FE2E_MIN_DEPTH_M)


def depth_metrics(
    prediction, depth_m, valid, space: str = "sqrt", min_depth: float = 1e-3, max_depth: float | None = None
) -> dict[str, float]:
    """Depth metrics of one image: ``prediction`` ``[H,W]`` in [0,1] (affine, near = 0) against ``depth_m`` ``[H,W]``
    in metres over the bool mask ``valid`` ``[H,W]``, after :func:`align_depth` in ``space``; see
    :func:`metric_depth_metrics` for the keys."""
    depth_m, valid = _float64(depth_m), _mask(valid)
    valid = valid & torch.isfinite(depth_m) & (depth_m > 0)
    if not bool(valid.any()):
        return dict.fromkeys(DEPTH_METRICS, math.nan)
    safe_gt = torch.where(valid, depth_m, torch.ones_like(depth_m))  # the fit must not see NaN/inf outside the mask
    return metric_depth_metrics(align_depth(prediction, safe_gt, valid, space, min_depth, max_depth), depth_m, valid)


def metric_depth_metrics(depth_pred_m, depth_m, valid) -> dict[str, float]:
    """Depth metrics of an already aligned prediction ``[H,W]`` in metres against ``depth_m`` over ``valid``.

    Keys (``DEPTH_METRICS``): ``abs_rel`` = mean |p−g|/g, ``sq_rel`` = mean (p−g)²/g, ``rmse`` (m), ``rmse_log``,
    ``log10`` = mean |log10 p − log10 g|, ``silog`` = 100·sqrt(var(log p − log g)) (the BTS/ZoeDepth definition),
    ``delta1..3`` = fraction of pixels with max(p/g, g/p) < 1.25^k (fractions, not %). Pixels whose ground truth is not
    a positive finite number are never valid. Without any valid pixel every value is NaN.
    """
    depth_m, valid = _float64(depth_m), _mask(valid)
    valid = valid & torch.isfinite(depth_m) & (depth_m > 0)
    if not bool(valid.any()):
        return dict.fromkeys(DEPTH_METRICS, math.nan)
    pred, gt = _float64(depth_pred_m)[valid], depth_m[valid]
    error = pred - gt
    log_error = torch.log(pred) - torch.log(gt)
    ratio = torch.maximum(pred / gt, gt / pred)
    return {
        "abs_rel": (error.abs() / gt).mean().item(),
        "sq_rel": (error**2 / gt).mean().item(),
        "rmse": error.pow(2).mean().sqrt().item(),
        "rmse_log": log_error.pow(2).mean().sqrt().item(),
        "log10": (torch.log10(pred) - torch.log10(gt)).abs().mean().item(),
        "silog": (log_error.pow(2).mean() - log_error.mean() ** 2).clamp_min(0).sqrt().item() * 100,
        **{f"delta{k}": (ratio < DELTA_BASE**k).double().mean().item() for k in (1, 2, 3)},
    }


def temporal_alignment_error(depths_m, intrinsics, world_from_camera, valid=None) -> float:
    """TAE as Video Depth Anything defines it, in % (×100): every depth map ``[T,H,W]`` (metres, already aligned to
    the truth) is back-projected with the camera ``intrinsics`` ``[3,3]`` (OpenCV, pixel centres at integers),
    moved by the true relative pose into the next frame (``world_from_camera`` ``[T,4,4]``, OpenCV camera frames),
    and compared by AbsRel with the next frame's depth at the nearest pixel; both directions, averaged over the
    ``2·(T−1)`` pairs. ``valid`` ``[T,H,W]`` (bool) marks pixels usable as targets (default: positive depth).
    """
    depths, poses = _float64(depths_m), _float64(world_from_camera)
    valid = depths > 0 if valid is None else _mask(valid) & (depths > 0)
    if depths.shape[0] < 2:
        raise ValueError("TAE needs at least two frames")
    errors = []
    for i in range(depths.shape[0] - 1):
        next_from_this = torch.linalg.inv(poses[i + 1]) @ poses[i]  # [4,4]
        errors.append(_reprojection_abs_rel(depths[i], depths[i + 1], valid[i + 1], next_from_this, intrinsics))
        errors.append(_reprojection_abs_rel(depths[i + 1], depths[i], valid[i], torch.linalg.inv(next_from_this),
                                            intrinsics))
    return float(np.mean(errors)) * 100


def _reprojection_abs_rel(source_m, target_m, target_valid, target_from_source, intrinsics) -> float:
    """AbsRel between ``source_m`` moved into the target camera and ``target_m`` (both ``[H,W]``, float64)."""
    k = _float64(intrinsics)
    height, width = source_m.shape
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                                indexing="ij")
    x = (cols - k[0, 2]) / k[0, 0] * source_m
    y = (rows - k[1, 2]) / k[1, 1] * source_m
    points = torch.stack([x, y, source_m], dim=-1).reshape(-1, 3)  # [HW,3] in the source camera
    moved = points @ target_from_source[:3, :3].T + target_from_source[:3, 3]  # [HW,3] in the target camera
    z = moved[:, 2]
    in_front = z > 0
    safe_z = torch.where(in_front, z, torch.ones_like(z))
    col = torch.round(k[0, 0] * moved[:, 0] / safe_z + k[0, 2])
    row = torch.round(k[1, 1] * moved[:, 1] / safe_z + k[1, 2])
    inside = in_front & (col >= 0) & (col < width) & (row >= 0) & (row < height) & (source_m.reshape(-1) > 0)
    index = (row.clamp(0, height - 1) * width + col.clamp(0, width - 1)).long()
    target = target_m.reshape(-1)[index]
    usable = inside & target_valid.reshape(-1)[index] & (target > 0)
    if not bool(usable.any()):
        return math.nan
    return ((z[usable] - target[usable]).abs() / target[usable]).mean().item()


# -------------------------------------------------------------------------------------------------------- normals


def normal_angular_errors(prediction, normals, valid) -> torch.Tensor:
    """Angles in degrees (float64 ``[N]``, N = valid pixels, row-major) between ``prediction`` and ``normals``
    (both ``[3,H,W]``, any length: the cosine normalises them) over the bool mask ``valid`` ``[H,W]``."""
    prediction, normals, valid = _float64(prediction), _float64(normals), _mask(valid)
    cosine = torch.nn.functional.cosine_similarity(prediction, normals, dim=0, eps=1e-8)  # [H,W]
    return torch.rad2deg(torch.acos(cosine.clamp(-1, 1)))[valid]


def angular_error_metrics(errors_deg) -> dict[str, float]:
    """Summary of angular errors in degrees: ``mean``, ``median`` (numpy's: the mean of the two middle values for an
    even count), ``rmse``, and ``below_5``, ``below_7_5``, ``below_11_25``, ``below_22_5``, ``below_30`` in % of pixels.
    Empty input gives NaN everywhere."""
    errors = _float64(errors_deg).reshape(-1)
    if errors.numel() == 0:
        return dict.fromkeys(NORMAL_METRICS, math.nan)
    summary = {
        "mean": errors.mean().item(),
        # numpy, not torch.quantile: that one refuses more than 2^24 values, which a pooled dataset exceeds.
        "median": float(np.median(errors.numpy())),
        "rmse": errors.pow(2).mean().sqrt().item(),
    }
    for name, threshold in zip(NORMAL_METRICS[3:], NORMAL_THRESHOLDS_DEG):
        summary[name] = (errors < threshold).double().mean().item() * 100
    return summary


class PooledAngularErrors:
    """Angular-error statistics of every pixel of a whole dataset (FE2E's pooled protocol) in constant memory.

    ``add`` each image's errors; ``summary`` returns the keys of :func:`angular_error_metrics`. Count, mean, RMSE
    and the shares below ``NORMAL_THRESHOLDS_DEG`` are exact (float64 sums, exact counts); the median comes from a
    histogram of ``POOLED_BIN_DEG`` bins over [0°, 180°]: each middle value is taken as its bin's centre, so the
    median is within ``POOLED_BIN_DEG / 2`` (0.0005°) of numpy's exact one.
    """

    def __init__(self, bin_deg: float = POOLED_BIN_DEG):
        self.bin_deg = bin_deg
        self.histogram = np.zeros(int(math.ceil(180.0 / bin_deg)) + 1, dtype=np.int64)
        self.count = 0
        self.sum_deg = 0.0
        self.sum_squares = 0.0
        self.below = np.zeros(len(NORMAL_THRESHOLDS_DEG), dtype=np.int64)

    def add(self, errors_deg) -> None:
        errors = _float64(errors_deg).reshape(-1).numpy()
        self.count += errors.size
        self.sum_deg += float(errors.sum())
        self.sum_squares += float(np.square(errors).sum())
        self.below += [int(np.count_nonzero(errors < t)) for t in NORMAL_THRESHOLDS_DEG]
        bins = np.clip(np.floor(errors / self.bin_deg), 0, self.histogram.size - 1).astype(np.int64)
        self.histogram += np.bincount(bins, minlength=self.histogram.size)

    def _value_of_rank(self, cumulative: np.ndarray, rank: int) -> float:
        """The centre of the bin holding the ``rank``-th smallest error (0-based), clipped to [0°, 180°]."""
        index = int(np.searchsorted(cumulative, rank, side="right"))
        return min((index + 0.5) * self.bin_deg, 180.0)

    def summary(self) -> dict[str, float]:
        if self.count == 0:
            return dict.fromkeys(NORMAL_METRICS, math.nan)
        cumulative = np.cumsum(self.histogram)
        middle = self.count // 2
        ranks = (middle,) if self.count % 2 else (middle - 1, middle)  # numpy: the mean of the two middle values
        summary = {
            "mean": self.sum_deg / self.count,
            "median": sum(self._value_of_rank(cumulative, rank) for rank in ranks) / len(ranks),
            "rmse": math.sqrt(self.sum_squares / self.count),
        }
        for name, below in zip(NORMAL_METRICS[3:], self.below):
            summary[name] = int(below) / self.count * 100
        return summary


def normal_metrics(prediction, normals, valid) -> dict[str, float]:
    """Angular-error metrics of one image (the E2P protocol: per image, then the caller averages over images);
    see :func:`normal_angular_errors` and :func:`angular_error_metrics`."""
    return angular_error_metrics(normal_angular_errors(prediction, normals, valid))


# -------------------------------------------------------------------------------------------------------- matting


def matting_metrics(alpha_pred, alpha_gt, conn_component: str = "most_frequent_label") -> dict[str, float]:
    """Matting metrics of one image over the whole image: ``alpha_pred`` and ``alpha_gt`` ``[H,W]`` in [0,1].

    ``mse`` = Σ(p−g)²/N and ``mad`` = Σ|p−g|/N (per pixel); ``sad`` = Σ|p−g|/1000; ``grad`` = Σ(|∇p| − |∇g|)²/1000
    with the Gaussian-derivative gradient (σ = 1.4, edge-replicated borders, ``e2p_core.filters``); ``conn`` =
    :func:`connectivity_error` with ``conn_component`` (default: the official Edit2Perceive evaluation's).
    """
    pred, gt = _float64(alpha_pred), _float64(alpha_gt)
    if pred.shape != gt.shape or pred.dim() != 2:
        raise ValueError(f"alpha_pred {tuple(pred.shape)} and alpha_gt {tuple(gt.shape)} must be the same [H,W]")
    difference = pred - gt
    gradients = gaussian_gradient_magnitude(torch.stack([pred, gt]), padding="replicate")  # [2,H,W]
    return {
        "mse": difference.pow(2).mean().item(),
        "mad": difference.abs().mean().item(),
        "sad": difference.abs().sum().item() / MATTING_SUM_SCALE,
        "grad": (gradients[0] - gradients[1]).pow(2).sum().item() / MATTING_SUM_SCALE,
        "conn": connectivity_error(pred.numpy(), gt.numpy(), component=conn_component),
    }


# Which pixels count as "connected" at each threshold of the connectivity error:
#  * "most_frequent_label" (default): the official Edit2Perceive evaluation (the common Python port of the DIM code):
#    the most frequent label of the 4-connected labelling of ``pred>=t & gt>=t``, the background label 0 included.
#    While the foreground covers less than half the image, the "component" is the background itself, so every
#    foreground pixel gets level t-step at the first threshold; background pixels are never assigned and end at 1.
#  * "largest_foreground": the dataset owners' code (DIM's MATLAB ``bwconncomp``, P3M's Python): the largest
#    4-connected foreground component; a threshold without any foreground assigns nothing.
CONN_COMPONENTS = ("most_frequent_label", "largest_foreground")


def _connected_at_threshold(both: np.ndarray, component: str) -> np.ndarray | None:
    """The bool mask of the pixels that stay connected at one threshold, or None when nothing is assigned."""
    labels, count = scipy.ndimage.label(both)  # default structure: 4-connectivity in 2-D; background label 0
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    if component == "most_frequent_label":
        return labels == int(np.argmax(sizes))  # ties: the lowest label, as np.argmax in the reference
    if count == 0:
        return None
    return labels == int(np.argmax(sizes[1:])) + 1


def connectivity_error(alpha_pred: np.ndarray, alpha_gt: np.ndarray, step: float = CONN_STEP,
                       component: str = "most_frequent_label") -> float:
    """The Deep Image Matting connectivity error over the whole image, divided by 1000.

    For thresholds ``step, 2·step, .., 1``: a pixel's level ``l`` is the threshold before the first one at which it
    is outside the connected set of ``(pred ≥ t) & (gt ≥ t)`` (see ``CONN_COMPONENTS`` for the two definitions of
    that set); pixels never assigned get ``l = 1``. Each alpha becomes ``φ = 1 − d·[d ≥ 0.15]`` with
    ``d = alpha − l``, and the error is Σ|φ_pred − φ_gt|.
    """
    if component not in CONN_COMPONENTS:
        raise ValueError(f"unknown connectivity component {component!r}; expected one of {CONN_COMPONENTS}")
    # The official script holds alphas in float32, and that decides ties such as 153/255 >= 0.6000000000000001
    # (true in float32, false in float64); the owners' code (MATLAB) works in double.
    source_dtype = np.float32 if component == "most_frequent_label" else np.float64
    pred = np.asarray(alpha_pred, dtype=source_dtype).astype(np.float64)
    gt = np.asarray(alpha_gt, dtype=source_dtype).astype(np.float64)
    thresholds = np.arange(0, 1 + step, step)  # as the reference: 0, 0.1, .., 1.0 with float rounding
    level = np.full(pred.shape, -1.0)
    for previous, threshold in zip(thresholds[:-1], thresholds[1:]):
        connected = _connected_at_threshold((pred >= threshold) & (gt >= threshold), component)
        if connected is not None:
            level[(level == -1) & ~connected] = previous
    level[level == -1] = 1.0
    phi_pred = 1 - (pred - level) * ((pred - level) >= CONN_MIN_DISTANCE)
    phi_gt = 1 - (gt - level) * ((gt - level) >= CONN_MIN_DISTANCE)
    return float(np.abs(phi_pred - phi_gt).sum() / MATTING_SUM_SCALE)
