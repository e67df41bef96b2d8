"""e2p_core.metrics against hand-computed values and independent numpy/scipy formulations."""

import math
from collections import deque

import numpy as np
import pytest
import scipy.ndimage
import torch

from e2p_core.metrics import (
    DEPTH_METRICS,
    align_depth,
    angular_error_metrics,
    connectivity_error,
    depth_metrics,
    matting_metrics,
    normal_angular_errors,
    normal_metrics,
)

# ---------------------------------------------------------------------------------------------------------- depth


def test_depth_hand_case_in_linear_space():
    # By hand: the LSQ line through (0,1), (0.5,2), (1,4) is g = 3p + 5/6, so the aligned depths are 5/6, 7/3, 23/6.
    prediction = torch.tensor([[0.0, 0.5, 1.0]])
    depth_m = torch.tensor([[1.0, 2.0, 4.0]])
    metrics = depth_metrics(prediction, depth_m, torch.ones(1, 3, dtype=torch.bool), space="uniform")
    assert metrics["abs_rel"] == pytest.approx((1 / 6 + (1 / 3) / 2 + (1 / 6) / 4) / 3)  # = 0.125
    assert metrics["sq_rel"] == pytest.approx((1 / 36 + (1 / 9) / 2 + (1 / 36) / 4) / 3)
    assert metrics["rmse"] == pytest.approx(math.sqrt(1 / 18))
    assert metrics["delta1"] == 1.0  # worst ratio is 1/(5/6) = 1.2 < 1.25
    logs = np.log([5 / 6, 7 / 3, 23 / 6]) - np.log([1, 2, 4])
    assert metrics["silog"] == pytest.approx(100 * math.sqrt(np.mean(logs**2) - np.mean(logs) ** 2))


def _numpy_depth_metrics(prediction, depth_m, valid, to_space, from_space, min_depth, max_depth):
    """An independent formulation of the official protocol: np.linalg.lstsq in the space, back, clip, formulas."""
    p, g = prediction[valid], depth_m[valid]
    (scale, shift), *_ = np.linalg.lstsq(np.stack([p, np.ones_like(p)], 1), to_space(g), rcond=None)
    pred = np.clip(from_space(scale * p + shift), min_depth, max_depth)
    ratio = np.maximum(pred / g, g / pred)
    log_diff = np.log(pred) - np.log(g)
    return {
        "abs_rel": np.mean(np.abs(pred - g) / g), "sq_rel": np.mean((pred - g) ** 2 / g),
        "rmse": np.sqrt(np.mean((pred - g) ** 2)), "rmse_log": np.sqrt(np.mean(log_diff**2)),
        "log10": np.mean(np.abs(np.log10(pred) - np.log10(g))), "silog": 100 * np.sqrt(np.var(log_diff)),
        "delta1": np.mean(ratio < 1.25), "delta2": np.mean(ratio < 1.25**2), "delta3": np.mean(ratio < 1.25**3),
    }


SPACES = {  # the E2P evaluation's own maps: sqrt(GT + 1e-6) then aligned², log then exp, or nothing
    "sqrt": (lambda d: np.sqrt(d + 1e-6), lambda a: a**2),
    "log": (lambda d: np.log(d + 1e-6), np.exp),
    "uniform": (lambda d: d, lambda a: a),
}


@pytest.mark.parametrize("space", sorted(SPACES))
def test_depth_metrics_match_an_independent_numpy_formulation(space):
    rng = np.random.default_rng(3)
    depth_m = rng.uniform(0.5, 9.0, (24, 32))
    prediction = np.clip(np.sqrt(depth_m) / 3 + rng.normal(0, 0.05, depth_m.shape), 0, 1)  # a noisy sqrt-ish guess
    valid = rng.random(depth_m.shape) > 0.2
    ours = depth_metrics(torch.tensor(prediction, dtype=torch.float32), torch.tensor(depth_m), torch.tensor(valid),
                         space=space, min_depth=1e-3, max_depth=10.0)
    expected = _numpy_depth_metrics(prediction.astype(np.float32).astype(np.float64), depth_m, valid, *SPACES[space],
                                    1e-3, 10.0)
    assert set(ours) == set(DEPTH_METRICS)
    for key in DEPTH_METRICS:
        assert ours[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-9), key


def test_sqrt_alignment_is_exact_for_an_affine_sqrt_prediction_and_differs_from_linear():
    depth_m = torch.linspace(0.5, 8.0, 60, dtype=torch.float64).reshape(6, 10)
    prediction = (torch.sqrt(depth_m + 1e-6) - 0.6) / 2.5  # what a perfect sqrt-trained model outputs
    valid = torch.ones_like(depth_m, dtype=torch.bool)
    exact = depth_metrics(prediction, depth_m, valid)  # default space: sqrt
    assert exact["abs_rel"] < 1e-9 and exact["delta1"] == 1.0 and exact["rmse"] < 1e-8
    linear = depth_metrics(prediction, depth_m, valid, space="uniform")
    assert linear["abs_rel"] > 1e-3  # aligning a sqrt-depth prediction linearly is the wrong protocol


def test_depth_ignores_invalid_pixels_and_clips_to_the_range():
    rng = np.random.default_rng(4)
    depth_m = torch.tensor(rng.uniform(1, 5, (8, 8)))
    prediction = torch.tensor(rng.random((8, 8)))
    valid = torch.ones(8, 8, dtype=torch.bool)
    valid[:, :2] = False
    corrupted_gt, corrupted_pred = depth_m.clone(), prediction.clone()
    corrupted_gt[:, 0], corrupted_gt[:, 1], corrupted_pred[:, :2] = float("nan"), 0.0, 1e6
    assert depth_metrics(corrupted_pred, corrupted_gt, valid) == pytest.approx(
        depth_metrics(prediction[:, 2:], depth_m[:, 2:], torch.ones(8, 6, dtype=torch.bool)))
    aligned = align_depth(prediction, depth_m, valid, min_depth=1.5, max_depth=2.0)
    assert aligned.min() >= 1.5 and aligned.max() <= 2.0
    assert all(math.isnan(v) for v in depth_metrics(prediction, depth_m, torch.zeros_like(valid)).values())


# -------------------------------------------------------------------------------------------------------- normals


def _rotated_about_x(angle_deg: float, length: float) -> list[float]:
    angle = math.radians(angle_deg)
    return [0.0, length * math.sin(angle), length * math.cos(angle)]


def test_normal_hand_case():
    # GT +z; predictions at 0, 10, 20, 40 degrees with various lengths; a fifth pixel is invalid garbage.
    prediction = torch.tensor([_rotated_about_x(a, s) for a, s in [(0, 1), (10, 2), (20, 0.5), (40, 1), (90, 1)]]).T
    normals = torch.tensor([[0.0, 0.0, 1.0]] * 4 + [[0.0, 0.0, 0.0]]).T
    valid = torch.tensor([True] * 4 + [False])
    metrics = normal_metrics(prediction[:, None], normals[:, None], valid[None])
    assert metrics["mean"] == pytest.approx(17.5)
    assert metrics["median"] == pytest.approx(15.0)  # numpy's median of an even count: mean of 10 and 20
    assert metrics["rmse"] == pytest.approx(math.sqrt((0 + 100 + 400 + 1600) / 4))
    assert [metrics[k] for k in ("below_5", "below_7_5", "below_11_25", "below_22_5", "below_30")] == \
        pytest.approx([25, 25, 50, 75, 75])


def test_normal_errors_match_a_pixel_loop_and_pool_over_images():
    rng = np.random.default_rng(5)
    prediction, normals = rng.normal(size=(2, 3, 5, 7))
    valid = rng.random((5, 7)) > 0.3
    errors = normal_angular_errors(torch.tensor(prediction), torch.tensor(normals), torch.tensor(valid)).numpy()
    expected = [math.degrees(math.acos(np.clip(np.dot(prediction[:, r, c], normals[:, r, c])
                                               / np.linalg.norm(prediction[:, r, c]) / np.linalg.norm(normals[:, r, c]),
                                               -1, 1)))
                for r in range(5) for c in range(7) if valid[r, c]]
    np.testing.assert_allclose(errors, expected, atol=1e-9)
    # Pooled (FE2E) differs from per-image (E2P) when images have different pixel counts.
    other = np.array([1.0, 2.0])
    pooled = angular_error_metrics(np.concatenate([errors, other]))
    assert pooled["mean"] == pytest.approx(np.mean(np.concatenate([errors, other])))
    assert pooled["median"] == pytest.approx(np.median(np.concatenate([errors, other])))
    assert math.isnan(angular_error_metrics(np.zeros(0))["mean"])


def test_pooled_summary_takes_more_pixels_than_torch_quantile_allows():
    # A dataset pooled FE2E-style easily exceeds 2^24 pixels (torch.quantile's limit); 2^24 + 2 values here.
    errors = np.zeros(2**24 + 2, dtype=np.float32)
    errors[2**23 + 1:] = 40.0  # half zeros, half 40: the two middle values are 0 and 40, the median is 20
    summary = angular_error_metrics(errors)
    assert summary["median"] == pytest.approx(20.0) and summary["mean"] == pytest.approx(20.0)
    assert summary["below_30"] == pytest.approx(50.0)


# -------------------------------------------------------------------------------------------------------- matting


def _dim_gradient(image: np.ndarray, sigma: float = 1.4) -> tuple[np.ndarray, np.ndarray]:
    """The Deep Image Matting evaluation's gaussgradient, written out as in its Python port."""
    def gauss(x):
        return np.exp(-x**2 / (2 * sigma**2)) / (sigma * np.sqrt(2 * np.pi))

    half = int(np.ceil(sigma * np.sqrt(-2 * np.log(np.sqrt(2 * np.pi) * sigma * 1e-2))))
    size = 2 * half + 1
    hx = np.zeros((size, size))
    for i in range(size):
        for j in range(size):
            hx[i, j] = gauss(i - half) * (-(j - half) * gauss(j - half) / sigma**2)
    hx /= np.sqrt(np.sum(hx * hx))
    return (scipy.ndimage.convolve(image, hx, mode="nearest"), scipy.ndimage.convolve(image, hx.T, mode="nearest"))


def test_matting_metrics_match_the_dim_formulas():
    rng = np.random.default_rng(6)
    gt = np.clip(scipy.ndimage.gaussian_filter((rng.random((20, 26)) > 0.5).astype(float), 2) * 1.5, 0, 1)
    pred = np.clip(gt + rng.normal(0, 0.1, gt.shape), 0, 1)
    metrics = matting_metrics(torch.tensor(pred, dtype=torch.float32), gt)
    pred = pred.astype(np.float32).astype(np.float64)
    assert metrics["mse"] == pytest.approx(np.sum((pred - gt) ** 2) / pred.size)
    assert metrics["mad"] == pytest.approx(np.sum(np.abs(pred - gt)) / pred.size)
    assert metrics["sad"] == pytest.approx(np.sum(np.abs(pred - gt)) / 1000)
    pred_gx, pred_gy = _dim_gradient(pred)
    gt_gx, gt_gy = _dim_gradient(gt)
    expected_grad = np.sum((np.hypot(pred_gx, pred_gy) - np.hypot(gt_gx, gt_gy)) ** 2) / 1000
    assert metrics["grad"] == pytest.approx(expected_grad, rel=1e-9)
    assert metrics["conn"] == pytest.approx(_official_connectivity(pred, gt), rel=1e-5)
    owners = matting_metrics(torch.tensor(pred, dtype=torch.float32), gt, conn_component="largest_foreground")
    assert owners["conn"] == pytest.approx(_flood_fill_connectivity(pred, gt))
    assert matting_metrics(gt, gt) == pytest.approx(dict.fromkeys(metrics, 0.0))
    with pytest.raises(ValueError, match="same"):
        matting_metrics(gt, gt[:, :-1])


def test_connectivity_hand_cases_of_the_largest_foreground_component():
    def owners(pred, gt):
        return connectivity_error(np.array(pred), np.array(gt), component="largest_foreground")

    # The last pixel is foreground in GT only: it leaves the component at the first threshold, level 0, so
    # φ_gt = 1 − 1 = 0 and φ_pred = 1 − 0·[0 ≥ 0.15] = 1.
    assert owners([[1.0, 1.0, 0.0, 0.0]], [[1.0, 1.0, 0.0, 1.0]]) == pytest.approx(1 / 1000)
    # A half-transparent island: connected to nothing, level 0, φ_pred = 0.5 and φ_gt = 0.
    assert owners([[1.0, 1.0, 0.0, 0.5]], [[1.0, 1.0, 0.0, 1.0]]) == pytest.approx(0.5 / 1000)
    # Diagonal neighbours are not connected (4-connectivity): the corner pixel is an island at level 0, so
    # φ_pred = 1 − 1 = 0 and φ_gt = 1 − 0.95 = 0.05. With 8-connectivity it would stay connected up to 0.9 and give 0.
    assert owners([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [[0.95, 0.0, 0.0], [0.0, 1.0, 1.0]]) == pytest.approx(0.05 / 1000)
    # A threshold without any foreground assigns nothing (P3M's `continue`): pixel 0 (pred 0.5) stays in the component
    # up to 0.5, is never assigned and ends at level 1, so φ = 1 for both; the rest left at 0.1 with alpha 0.
    assert owners([[0.5, 0.0, 0.0, 0.0]], [[1.0, 0.0, 0.0, 0.0]]) == 0.0
    assert connectivity_error(np.eye(3), np.eye(3), component="largest_foreground") == 0.0


def test_connectivity_hand_cases_of_the_official_most_frequent_label():
    # One foreground pixel among four: the most frequent label at t = 0.1 is the background (3 pixels), so the
    # foreground pixel is "outside" and gets level 0: φ_pred = 1 − 0.5 = 0.5, φ_gt = 1 − 1 = 0. The background pixels
    # are never assigned (level 1, φ = 1 for both).
    assert connectivity_error(np.array([[0.5, 0.0, 0.0, 0.0]]), np.array([[1.0, 0.0, 0.0, 0.0]])) == \
        pytest.approx(0.5 / 1000)
    # A tie (2 foreground, 2 background) goes to the lower label, the background: pixels 0 and 1 get level 0 and
    # φ = 0 in both maps, pixel 3 (GT only) keeps level 1 and φ = 1 in both maps. Error 0 (the owners' variant: 1).
    assert connectivity_error(np.array([[1.0, 1.0, 0.0, 0.0]]), np.array([[1.0, 1.0, 0.0, 1.0]])) == 0.0
    # A foreground larger than the background behaves like the largest component.
    pred, gt = np.array([[1.0, 1.0, 1.0, 0.0, 0.5]]), np.array([[1.0, 1.0, 1.0, 0.0, 1.0]])
    assert connectivity_error(pred, gt) == connectivity_error(pred, gt, component="largest_foreground") == \
        pytest.approx(0.5 / 1000)
    with pytest.raises(ValueError, match="largest_foreground"):
        connectivity_error(pred, gt, component="largest")


def _official_connectivity(pred: np.ndarray, gt: np.ndarray) -> float:
    """The official Edit2Perceive Conn, written out as its script does it: float32 level map, labels of
    ``pred≥t & gt≥t`` with 4-connectivity, the most frequent label (np.bincount, background 0 included)."""
    pred, gt = pred.astype(np.float32), gt.astype(np.float32)
    thresholds = list(np.arange(0, 1.1, 0.1))
    level = np.full(pred.shape, -1, dtype=np.float32)
    for i in range(1, len(thresholds)):
        labels, _ = scipy.ndimage.label((pred >= thresholds[i]) & (gt >= thresholds[i]),
                                        structure=[[0, 1, 0], [1, 1, 1], [0, 1, 0]])
        omega = labels == np.argmax(np.bincount(labels.flat))
        level[(level == -1) & ~omega] = thresholds[i - 1]
    level[level == -1] = 1
    pred_d, gt_d = pred - level, gt - level
    return float(np.sum(np.abs((1 - pred_d * (pred_d >= 0.15)) - (1 - gt_d * (gt_d >= 0.15)))) / 1000)


def _soft_blob(shape, radius: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(pred, gt): a soft disc of ``radius`` (a fraction of the short side) with a noisy edge, and a noisy copy."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]]
    distance = np.hypot(rows - shape[0] / 2, cols - shape[1] / 2) / min(shape)
    gt = np.clip((radius - distance) * 12 + 0.5 + rng.normal(0, 0.05, shape), 0, 1)
    gt[rng.random(shape) < 0.01] = 0.7  # specks: small foreground islands
    pred = np.clip(gt + rng.normal(0, 0.15, shape), 0, 1)
    return pred.astype(np.float32).astype(np.float64), np.round(gt * 255) / 255


@pytest.mark.parametrize(("radius", "small"), [(0.15, True), (0.25, True), (0.7, False)])
def test_connectivity_matches_the_official_semantics_for_small_and_large_foregrounds(radius, small):
    pred, gt = _soft_blob((60, 80), radius, seed=int(radius * 100))
    assert ((gt >= 0.1).mean() < 0.5) == small
    official = connectivity_error(pred, gt)
    assert official == pytest.approx(_official_connectivity(pred, gt), rel=1e-5)
    owners = connectivity_error(pred, gt, component="largest_foreground")
    assert owners == pytest.approx(_flood_fill_connectivity(pred, gt))
    if small:  # the two definitions differ exactly when the background is the most frequent label
        assert abs(official - owners) > 0.01 * owners


def _flood_fill_connectivity(pred: np.ndarray, gt: np.ndarray) -> float:
    """The owners' connectivity error with a breadth-first flood fill instead of scipy.ndimage.label."""
    height, width = pred.shape
    level = np.full(pred.shape, -1.0)
    thresholds = np.arange(0, 1.1, 0.1)
    for i in range(1, len(thresholds)):
        both = (pred >= thresholds[i]) & (gt >= thresholds[i])
        seen, best = np.zeros_like(both), []
        for start in zip(*np.nonzero(both)):
            if seen[start]:
                continue
            component, queue = [], deque([start])
            seen[start] = True
            while queue:
                r, c = queue.popleft()
                component.append((r, c))
                for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                    if 0 <= nr < height and 0 <= nc < width and both[nr, nc] and not seen[nr, nc]:
                        seen[nr, nc] = True
                        queue.append((nr, nc))
            best = component if len(component) > len(best) else best
        if not best:
            continue  # P3M: a threshold without foreground assigns nothing
        omega = np.zeros_like(both)
        for pixel in best:
            omega[pixel] = True
        level[(level == -1) & ~omega] = thresholds[i - 1]
    level[level == -1] = 1
    phi = [1 - (a - level) * ((a - level) >= 0.15) for a in (pred, gt)]
    return float(np.abs(phi[0] - phi[1]).sum() / 1000)
