"""The shared math of training and evaluation: scale/shift alignment, the Gaussian-gradient filter, target encodings."""

import numpy as np
import pytest
import scipy.ndimage
import torch

from e2p_core.alignment import align_scale_shift, fit_scale_shift
from e2p_core.filters import gaussian_derivative_kernels, gaussian_gradient_magnitude
from e2p_core.targets import (
    DEPTH_SPACES,
    depth_from_space,
    depth_to_space,
    encode_alpha_target,
    encode_depth_target,
    encode_normal_target,
)


def test_fit_scale_shift_matches_numpy_lstsq_over_the_mask():
    rng = np.random.default_rng(0)
    prediction, target = rng.random((3, 6, 9)), rng.random((3, 6, 9))
    valid = rng.random((3, 6, 9)) > 0.3
    scale, shift = fit_scale_shift(torch.tensor(prediction), torch.tensor(target), torch.tensor(valid))
    for b in range(3):
        p, g = prediction[b][valid[b]], target[b][valid[b]]
        (s, t), *_ = np.linalg.lstsq(np.stack([p, np.ones_like(p)], 1), g, rcond=None)
        assert scale[b].item() == pytest.approx(s, rel=1e-9)
        assert shift[b].item() == pytest.approx(t, rel=1e-9, abs=1e-12)


def test_alignment_recovers_an_exact_affine_map_and_ignores_invalid_pixels():
    prediction = torch.linspace(0, 1, 20).reshape(1, 4, 5)
    target = 2.5 * prediction - 0.75
    valid = torch.ones_like(prediction, dtype=torch.bool)
    target[0, 0, 0], valid[0, 0, 0] = 1e6, False  # an outlier the mask must hide
    aligned = align_scale_shift(prediction, target, valid)
    assert torch.allclose(aligned[valid], target[valid], atol=1e-6)


def test_constant_prediction_gets_the_target_mean_and_gradients_flow():
    prediction = torch.full((1, 3, 3), 0.5, requires_grad=True)
    target = torch.arange(9.0).reshape(1, 3, 3)
    scale, shift = fit_scale_shift(prediction, target)
    assert scale.item() == 0 and shift.item() == pytest.approx(4.0)
    varied = torch.rand(1, 3, 3, requires_grad=True)
    align_scale_shift(varied, target).sum().backward()
    assert torch.isfinite(varied.grad).all()


def test_gaussian_kernels_are_9x9_unit_norm_and_antisymmetric():
    kernel_x, kernel_y = gaussian_derivative_kernels()
    assert kernel_x.shape == (9, 9)
    assert kernel_x.pow(2).sum().item() == pytest.approx(1.0)
    assert torch.allclose(kernel_x, -kernel_x.flip(1)) and torch.equal(kernel_y, kernel_x.T)


def test_gradient_magnitude_matches_scipy_convolve_nearest():
    image = np.random.default_rng(1).random((17, 23))
    kernel_x, kernel_y = (k.numpy() for k in gaussian_derivative_kernels())
    gx = scipy.ndimage.convolve(image, kernel_x, mode="nearest")
    gy = scipy.ndimage.convolve(image, kernel_y, mode="nearest")
    ours = gaussian_gradient_magnitude(torch.tensor(image)[None])[0].numpy()
    np.testing.assert_allclose(ours, np.hypot(gx, gy), atol=1e-12)
    zero_padded = scipy.ndimage.convolve(image, kernel_x, mode="constant")
    ours_zero = gaussian_gradient_magnitude(torch.tensor(image)[None], padding="zeros")[0].numpy()
    gy_zero = scipy.ndimage.convolve(image, kernel_y, mode="constant")
    np.testing.assert_allclose(ours_zero, np.hypot(zero_padded, gy_zero), atol=1e-12)


@pytest.mark.parametrize("space", DEPTH_SPACES)
def test_depth_spaces_invert(space):
    depth_m = torch.tensor([0.01, 0.5, 3.0, 80.0], dtype=torch.float64)
    assert torch.allclose(depth_from_space(depth_to_space(depth_m, space), space), depth_m, rtol=1e-9, atol=1e-9)


def test_depth_target_uses_percentiles_of_valid_pixels_and_near_is_minus_one():
    depth_m = torch.linspace(1, 100, 101)[None].repeat(2, 1)  # [2,101]
    valid = torch.ones_like(depth_m, dtype=torch.bool)
    valid[1] = False
    target = encode_depth_target(depth_m, valid, space="uniform")
    # By hand: percentiles 2/98 of 1..100 over 101 evenly spaced values are 2.98 and 98.02.
    assert target[0, 3].item() == pytest.approx(((3.97 - 2.98) / (98.02 - 2.98) - 0.5) * 2, abs=1e-5)
    assert target[0, 0].item() == -1 and target[0, -1].item() == 1
    sqrt_target = encode_depth_target(depth_m[:1], valid[:1], space="sqrt")
    assert torch.all(sqrt_target[0, 1:] >= sqrt_target[0, :-1])  # monotone: near stays −1
    with pytest.raises(ValueError, match="no valid pixel"):
        encode_depth_target(depth_m, torch.zeros_like(valid))


def test_normal_and_alpha_targets():
    normals = torch.tensor([[3.0, 0.0], [0.0, 0.0], [4.0, 0.0]]).reshape(3, 1, 2)
    unit, valid = encode_normal_target(normals)
    assert valid.tolist() == [[True, False]]
    assert torch.allclose(unit[:, 0, 0], torch.tensor([0.6, 0.0, 0.8]))
    alpha = torch.tensor([0.0, 0.4, 0.6, 1.0])
    assert encode_alpha_target(alpha).tolist() == [-1, -1, 1, 1]
    assert torch.allclose(encode_alpha_target(alpha, binarize=False), torch.tensor([-1.0, -0.2, 0.2, 1.0]))


def test_depth_target_of_a_large_image_past_torch_quantile_limit():
    """More valid pixels than torch.quantile accepts (2^24): the percentiles still come out (here by hand: a ramp)."""
    side = 4097  # 4097^2 > 2^24
    depth_m = torch.linspace(1, 2, side * side, dtype=torch.float32).reshape(side, side)
    target = encode_depth_target(depth_m, torch.ones_like(depth_m, dtype=torch.bool), space="uniform")
    middle = target.flatten()[side * side // 2].item()
    assert middle == pytest.approx(0.0, abs=1e-4) and target.min() == -1 and target.max() == 1
