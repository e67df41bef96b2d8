"""The consistency losses of ``python -m train`` against values computed by hand or by an independent formulation."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from train.losses import (
    angular_error,
    angular_normal_loss,
    matting_region_l1,
    reference_depth_loss,
    reference_matting_loss,
    reference_normal_loss,
    ssi_depth_l1,
)


def as_rgb(plane: torch.Tensor) -> torch.Tensor:
    """[B,H,W] -> [B,3,H,W]: the 3-channel replication of depth/matting targets."""
    return plane[:, None].repeat(1, 3, 1, 1)


def unit_field(vector, hw=(2, 2)) -> torch.Tensor:
    return torch.tensor(vector, dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, *hw).clone()


def test_ssi_depth_l1_is_the_residual_of_numpys_least_squares_line():
    prediction = torch.tensor([[[0.0, 1.0, 2.0, 3.0, 5.0]]])
    target = torch.tensor([[[0.1, 0.9, 2.2, 2.7, 4.0]]])
    scale, shift = np.polyfit(prediction.flatten().numpy(), target.flatten().numpy(), 1)
    expected = np.abs(scale * prediction.flatten().numpy() + shift - target.flatten().numpy()).mean()
    valid = torch.ones(1, 1, 5, dtype=torch.bool)
    loss = ssi_depth_l1(as_rgb(prediction), as_rgb(target), valid)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_ssi_depth_l1_ignores_affine_maps_and_invalid_pixels():
    target = torch.tensor([[[0.1, 0.5, -0.3, 0.9]]])
    prediction = 3.0 * target - 0.7
    prediction[0, 0, 3] = 100.0  # an outlier, but on an invalid pixel
    valid = torch.tensor([[[True, True, True, False]]])
    assert ssi_depth_l1(as_rgb(prediction), as_rgb(target), valid).item() == pytest.approx(0.0, abs=1e-6)
    assert ssi_depth_l1(as_rgb(prediction), as_rgb(target), torch.ones_like(valid)).item() > 1e-3


@pytest.mark.parametrize("prediction, truth, degrees", [
    ((1, 0, 0), (0, 1, 0), 90.0),
    ((2, 0, 0), (1, 1, 0), 45.0),  # the prediction's length does not matter
    ((0, 0, 1), (0, 0, 1), 0.0),
    ((0, 1, 0), (0, -1, 0), 180.0),
    ((1, 1, 1), (1, 0, 0), math.degrees(math.acos(1 / math.sqrt(3)))),
])
def test_angular_error_matches_hand_computed_angles(prediction, truth, degrees):
    error = angular_error(unit_field(prediction), unit_field(truth))
    torch.testing.assert_close(error, torch.full((1, 2, 2), math.radians(degrees)), atol=1e-3, rtol=0)


@pytest.mark.parametrize("offset", [0.0, 1e-9, 1e-7, 1e-4])
def test_angular_loss_gradient_is_finite_for_near_collinear_normals(offset):
    truth = unit_field((0.0, 0.0, 1.0))
    prediction = unit_field((offset, 0.0, 1.0)).requires_grad_(True)
    loss = angular_normal_loss(prediction, truth, torch.ones(1, 2, 2, dtype=torch.bool))
    loss.backward()
    assert torch.isfinite(prediction.grad).all()
    assert loss.item() == pytest.approx(offset, abs=1e-5)


def test_angular_normal_loss_averages_valid_pixels_only():
    truth = unit_field((0.0, 0.0, 1.0))
    prediction = truth.clone()
    prediction[0, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0])  # 90 degrees off on one pixel
    valid = torch.tensor([[[True, True], [True, False]]])
    assert angular_normal_loss(prediction, truth, valid).item() == pytest.approx(math.pi / 2 / 3, rel=1e-5)


def test_matting_region_l1_adds_the_unknown_and_known_means():
    target = torch.tensor([[[0.0, 0.0, 0.0, 0.0]]])
    decoded = torch.tensor([[[0.1, -0.2, 0.3, 0.4]]])
    trimap = torch.tensor([[[0, 128, 255, 128]]], dtype=torch.uint8)
    # unknown: |−0.2|, |0.4| -> 0.3; known: |0.1|, |0.3| -> 0.2
    assert matting_region_l1(as_rgb(decoded), as_rgb(target), trimap).item() == pytest.approx(0.5, rel=1e-6)
    all_known = torch.zeros_like(trimap)
    assert matting_region_l1(as_rgb(decoded), as_rgb(target), all_known).item() == pytest.approx(0.25, rel=1e-6)


def test_reference_depth_loss_equals_silog_plus_sobel_by_scipy():
    rng = np.random.default_rng(0)
    decoded = rng.uniform(-1.2, 1.2, (1, 6, 7))
    target = rng.uniform(-1, 1, (1, 6, 7))
    valid = rng.uniform(size=(1, 6, 7)) > 0.3
    p = (np.clip(decoded, -1, 1) + 1) / 2 + 1e-8
    g = (np.clip(target, -1, 1) + 1) / 2 + 1e-8
    d = (np.log1p(p) - np.log1p(g))[valid]
    silog = (d**2).mean() - 0.85 * d.mean() ** 2
    sobel_x = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float64)
    dilated = ndimage.binary_dilation(valid[0], structure=np.ones((3, 3)))
    grad = 0.0
    for kernel in (sobel_x, sobel_x.T):
        diff = ndimage.correlate(p[0], kernel, mode="constant") - ndimage.correlate(g[0], kernel, mode="constant")
        grad += np.abs(diff)[dilated].mean()
    loss = reference_depth_loss(as_rgb(torch.tensor(decoded)), as_rgb(torch.tensor(target)), torch.tensor(valid))
    assert loss.item() == pytest.approx(silog + grad, rel=1e-5)


def test_reference_normal_loss_is_degrees_times_weight_over_100():
    truth = unit_field((0.0, 1.0, 0.0))
    prediction = unit_field((1.0, 0.0, 0.0))
    valid = torch.ones(1, 2, 2, dtype=torch.bool)
    loss = reference_normal_loss(prediction, truth, valid, torch.tensor([1.5]))
    assert loss.item() == pytest.approx(90 * 1.5 / 100, rel=1e-4)


def test_reference_matting_loss_on_a_flat_unknown_band():
    """Flat images: the Gaussian-gradient term vanishes away from the borders, leaving L1/1000 + MSE on U."""
    target = torch.zeros(1, 12, 12)
    decoded = torch.full((1, 12, 12), 0.2)
    trimap = torch.zeros(1, 12, 12, dtype=torch.uint8)
    trimap[0, 5:7, 5:7] = 128  # 4 unknown pixels, 5 px from every border (the kernel reaches 4)
    trimap[0, 0, :] = 255  # known pixels are not supervised at all
    loss = reference_matting_loss(as_rgb(decoded), as_rgb(target), trimap)
    assert loss.item() == pytest.approx(4 * 0.2 / 1000 + 0.04, rel=1e-5)


def test_reference_matting_gradient_term_sees_edges():
    target = torch.zeros(1, 12, 12)
    decoded = torch.zeros(1, 12, 12)
    decoded[0, :, 6:] = 0.5  # a vertical edge through the unknown band
    trimap = torch.full((1, 12, 12), 128, dtype=torch.uint8)
    edge_free = reference_matting_loss(as_rgb(target), as_rgb(target), trimap)
    with_edge = reference_matting_loss(as_rgb(decoded), as_rgb(target), trimap)
    assert edge_free.item() == pytest.approx(0.0, abs=1e-9) and with_edge.item() > 0.1
