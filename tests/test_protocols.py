"""The evaluation protocols (E2P, FE2E) against hand-computed alignments, and the pooled normal statistics against
numpy's exact ones."""

import math

import numpy as np
import pytest
import torch

from e2p_core.errors import InputError
from e2p_core.evaluation.protocols import E2P, FE2E, get_protocol
from e2p_core.metrics import POOLED_BIN_DEG, PooledAngularErrors, align_depth_log_fe2e, angular_error_metrics

E = math.e

# ------------------------------------------------------------------------------------------- FE2E depth alignment


def test_fe2e_fit_uses_only_positive_predictions_and_clips_log_depth_at_5():
    # Pixels 0-3 lie exactly on ln(d) = 2p + 0.5; pixel 4 has a negative prediction and a ground truth far off that
    # line, pixel 5 a zero prediction: neither enters the fit, so the fit is exactly s = 2, t = 0.5.
    prediction = torch.tensor([[0.25, 0.5, 1.0, 2.5, -0.5, 0.0]], dtype=torch.float64)
    log_depth = 2 * prediction + 0.5
    depth_m = torch.exp(log_depth)
    depth_m[0, 4], depth_m[0, 5] = 300.0, 50.0
    valid = torch.ones_like(prediction, dtype=torch.bool)
    aligned = align_depth_log_fe2e(prediction, depth_m, valid, min_depth=1e-5, max_depth=None)
    expected = [E**1.0, E**1.5, E**2.5, E**5.0,  # 2·2.5 + 0.5 = 5.5, clipped at 5 before exp
                E**-0.5, E**0.5]  # the excluded pixels still get the fit: 2·(−0.5) + 0.5, 2·0 + 0.5
    np.testing.assert_allclose(aligned[0].numpy(), expected, rtol=1e-12)


def test_fe2e_depth_ranges_clip_predictions_and_mask_ground_truth():
    prediction = torch.tensor([[0.25, 0.5, 1.0, 2.5, -2.0]], dtype=torch.float64)
    depth_m = torch.exp(2 * prediction + 0.5)  # all on the line: ln d = 2p + 0.5
    valid = torch.ones_like(prediction, dtype=torch.bool)
    # DIODE: predictions clipped to [0.6, 350] m; e^(−3.5) = 0.030 -> 0.6, e^5 = 148 stays.
    aligned = align_depth_log_fe2e(prediction, depth_m, valid, 0.6, 350.0)
    np.testing.assert_allclose(aligned[0].numpy(), [E**1.0, E**1.5, E**2.5, E**5.0, 0.6], rtol=1e-12)
    # ETH3D is unbounded above and starts at 1e-5; KITTI starts at 1e-5 too.
    assert (FE2E.depth_range("eth3d").min_m, FE2E.depth_range("eth3d").max_m) == (1e-5, math.inf)
    assert (FE2E.depth_range("kitti").min_m, FE2E.depth_range("kitti").max_m) == (1e-5, 80.0)
    diode = FE2E.depth_range("diode")
    assert (diode.min_m, diode.max_m, diode.masks_ground_truth) == (0.6, 350.0, False)
    assert E2P.depth_range("eth3d").max_m == 99999.0 and E2P.depth_range("diode").masks_ground_truth
    # Range masks are strict on both sides, as Marigold's dataset classes.
    np.testing.assert_array_equal(FE2E.depth_range("nyuv2").valid(np.array([1e-3, 0.5, 10.0, np.inf])),
                                  [False, True, False, False])


def test_fe2e_depth_metrics_by_hand():
    # One pixel with a negative prediction stays in the SCORED set although it is outside the fit.
    prediction = torch.tensor([[0.5, 1.0, 1.5, -1.0]], dtype=torch.float64)
    # ln d = 2p + 0.5 on the positive pixels
    depth_m = torch.tensor([[E**1.5, E**2.5, E**3.5, 2.0]], dtype=torch.float64)
    valid = torch.ones_like(prediction, dtype=torch.bool)
    metrics = FE2E.depth_metrics(prediction, depth_m.numpy(), valid.numpy(), "eth3d")
    last = E**-1.5  # 2·(−1) + 0.5
    assert metrics["abs_rel"] == pytest.approx(abs(last - 2.0) / 2.0 / 4)
    assert metrics["delta1"] == pytest.approx(0.75)
    assert metrics["rmse"] == pytest.approx(math.sqrt((last - 2.0) ** 2 / 4))
    # E2P's log space is another protocol: +1e-6 inside the log and a fit over every valid pixel.
    e2p_log = get_protocol("e2p", depth_space="log").depth_metrics(prediction, depth_m.numpy(), valid.numpy(), "eth3d")
    assert e2p_log["abs_rel"] != pytest.approx(metrics["abs_rel"])


def test_protocol_options_are_recorded_and_fe2e_is_fixed():
    assert get_protocol("e2p") is E2P and get_protocol("e2p", depth_space="sqrt") is E2P
    changed = get_protocol("e2p", depth_space="uniform", conn_component="largest_foreground")
    assert changed.depth_space == "uniform" and changed.conn_component == "largest_foreground"
    assert "changed: depth space uniform, conn component largest_foreground" in changed.describe("depth")
    assert "largest foreground" in changed.describe("matting")
    with pytest.raises(InputError, match="fixed"):
        get_protocol("fe2e", normal_aggregation="per_image")
    with pytest.raises(InputError, match="no matting"):
        FE2E.check("matting")
    with pytest.raises(InputError, match="no evaluation protocol"):
        get_protocol("marigold")


def test_fe2e_resize_is_half_pixel_bilinear_and_renormalises_normals():
    normals = torch.nn.functional.normalize(torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(0)), dim=0)
    resized = FE2E.resize(normals, (8, 12), "normal")
    direct = torch.nn.functional.interpolate(normals[None], size=(8, 12), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(resized, direct / direct.norm(dim=0, keepdim=True))
    e2p = E2P.resize(normals, (8, 12), "normal")
    torch.testing.assert_close(e2p, torch.nn.functional.interpolate(normals[None], size=(8, 12), mode="bilinear",
                                                                    align_corners=True)[0])
    assert e2p.norm(dim=0).min() < 0.999  # E2P does not renormalise


# --------------------------------------------------------------------------------------- pooled normal statistics


@pytest.mark.parametrize("count", [1, 2, 999, 100_000])
def test_pooled_statistics_match_numpy_and_bound_the_median(count):
    rng = np.random.default_rng(count)
    errors = np.concatenate([rng.gamma(2.0, 6.0, count // 2), rng.uniform(0, 180, count - count // 2)])
    errors[: min(count, 3)] = [0.0, 180.0, 11.25][: min(count, 3)]  # the edges and a threshold value itself
    pooled = PooledAngularErrors()
    for chunk in np.array_split(errors, 7):  # images of different sizes, one at a time
        pooled.add(torch.from_numpy(chunk))
    exact = angular_error_metrics(errors)
    summary = pooled.summary()
    for key in exact:
        if key == "median":
            assert abs(summary[key] - exact[key]) <= POOLED_BIN_DEG / 2 + 1e-12
        else:
            assert summary[key] == pytest.approx(exact[key], rel=1e-12, abs=1e-12), key
    assert pooled.histogram.nbytes < 2e6  # constant memory, whatever the pixel count


def test_pooled_statistics_of_nothing_are_nan():
    assert all(math.isnan(value) for value in PooledAngularErrors().summary().values())
