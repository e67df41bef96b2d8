"""Flow-matching pieces of ``python -m train``: grid timesteps, bell weight, path, loss, clean estimate, λ, noise."""

import math

import pytest
import torch

from e2p_core.schedule import euler_step, make_schedule
from train.noise import fixed_seed_noise, multi_res_noise, training_noise
from train.objective import (
    GRID_SIGMAS,
    GRID_WEIGHTS,
    adaptive_lambda,
    clean_estimate,
    consistency_ramp,
    flow_matching_loss,
    latent_mask,
    noisy_latent,
    sample_timesteps,
    target_velocity,
)


def test_bell_weight_has_mean_one_zero_minimum_and_peaks_at_t500():
    assert GRID_WEIGHTS.mean().item() == pytest.approx(1.0, rel=1e-5)
    assert GRID_WEIGHTS.min().item() == pytest.approx(0.0, abs=1e-7)
    peak = GRID_SIGMAS[GRID_WEIGHTS.argmax()].item() * 1000
    assert abs(peak - 500) < 3  # grid spacing near t = 500 is about 1.3


def test_timesteps_are_grid_points_rounded_like_the_model_dtype():
    generator = torch.Generator().manual_seed(0)
    drawn = sample_timesteps(64, generator, torch.float32, "cpu")
    assert drawn.timestep.dtype == torch.float32
    torch.testing.assert_close(drawn.timestep / 1000, drawn.sigma)
    rounded = sample_timesteps(64, torch.Generator().manual_seed(0), torch.bfloat16, "cpu")
    assert rounded.timestep.dtype == torch.bfloat16
    assert torch.equal(rounded.timestep, drawn.timestep.to(torch.bfloat16))  # same draws, rounded
    # sigma is the grid point nearest to the rounded timestep: within half a bf16 ulp of it (4 at t ~ 1000)
    assert ((rounded.sigma * 1000 - rounded.timestep.float()).abs() <= 4.0).all()
    assert (rounded.weight >= 0).all()


def test_path_target_and_masked_loss_by_hand():
    clean = torch.full((1, 16, 2, 2), 2.0)
    noise = torch.full((1, 16, 2, 2), -1.0)
    sigma = torch.tensor([0.25])
    torch.testing.assert_close(noisy_latent(clean, noise, sigma), torch.full((1, 16, 2, 2), 0.75 * 2 - 0.25))
    torch.testing.assert_close(target_velocity(clean, noise), torch.full((1, 16, 2, 2), -3.0))
    velocity = torch.zeros(2, 16, 2, 2)
    target = torch.ones(2, 16, 2, 2)
    target[1] = 2.0  # squared error 1 for sample 0, 4 for sample 1
    mask = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]], [[[1.0, 1.0], [1.0, 1.0]]]])
    weight = torch.tensor([2.0, 0.5])
    # sample 0: masked mean over ALL pixels = 0.5, weighted 1.0; sample 1: 4 * 0.5 = 2.0; batch mean 1.5
    assert flow_matching_loss(velocity, target, weight, mask).item() == pytest.approx(1.5)


def test_latent_mask_is_nearest_downsampled():
    valid = torch.zeros(1, 16, 16, dtype=torch.bool)
    valid[:, :8] = True
    mask = latent_mask(valid, (2, 2))
    assert mask.shape == (1, 1, 2, 2) and mask[0, 0].tolist() == [[1.0, 1.0], [0.0, 0.0]]


def test_clean_estimate_at_t1000_is_the_one_step_inference_update():
    noisy = torch.randn(1, 16, 4, 4)
    velocity = torch.randn(1, 16, 4, 4)
    schedule = make_schedule(1)
    expected = euler_step(noisy, velocity, schedule.sigmas[0:1], schedule.sigmas[1:2])
    estimate = clean_estimate(noisy, velocity, torch.tensor([1000.0]))
    torch.testing.assert_close(estimate, expected)


def test_clean_estimate_inverts_the_path_for_the_true_velocity():
    clean, noise = torch.randn(3, 16, 4, 4), torch.randn(3, 16, 4, 4)
    sample = sample_timesteps(3, torch.Generator().manual_seed(3), torch.float32, "cpu")
    noisy = noisy_latent(clean, noise, sample.sigma)
    estimate = clean_estimate(noisy, target_velocity(clean, noise), sample.timestep)
    # x̂0 = x_t − (1 − σ̃(1000−t))·v with 1 − σ̃(1000−t) ≈ σ: within one grid spacing of the truth
    assert (estimate - clean).abs().max().item() < 0.05 * (noise - clean).abs().max().item()


def test_lambda_is_zero_in_the_first_epoch_then_ramps_with_the_loss_ratio():
    assert consistency_ramp(0, 100) == 0.0
    assert consistency_ramp(100, 100) == 0.0
    assert consistency_ramp(150, 100) == pytest.approx(0.5)
    assert consistency_ramp(30, 100, start_epoch=0.0) == pytest.approx(0.3)
    loss_fm = torch.tensor(2.0, requires_grad=True)
    loss_consistency = torch.tensor(-0.999, requires_grad=True)
    assert adaptive_lambda(loss_fm, loss_consistency, 0.5) == pytest.approx(2.0 / 1.0 * 0.5)
    assert adaptive_lambda(loss_fm, loss_consistency, 0.0) == 0.0
    assert isinstance(adaptive_lambda(loss_fm, loss_consistency, 1.0), float)  # stop-gradient: a plain number


def test_multi_res_noise_shape_std_and_seeded_determinism():
    strength = torch.tensor([0.9, 0.1])
    first = multi_res_noise((2, 16, 24, 32), strength, seed=42, device="cpu")
    assert first.shape == (2, 16, 24, 32) and first.dtype == torch.float32
    assert first.std().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(first, multi_res_noise((2, 16, 24, 32), strength, seed=42, device="cpu"))
    assert not torch.allclose(first, multi_res_noise((2, 16, 24, 32), strength, seed=7, device="cpu"))


def neighbour_correlation(noise: torch.Tensor) -> float:
    left, right = noise[..., :-1].flatten(), noise[..., 1:].flatten()
    return torch.corrcoef(torch.stack([left, right]))[0, 1].item()


def test_multi_res_noise_is_annealed_by_the_timestep():
    """Strength 0.9·t/1000: high noise levels get strong low-frequency components, t ≈ 0 is nearly white."""
    shape = (1, 16, 48, 48)
    coarse = multi_res_noise(shape, torch.tensor([0.9]), 0, "cpu")
    white = multi_res_noise(shape, torch.tensor([0.0]), 0, "cpu")
    assert neighbour_correlation(coarse) > 0.3
    assert abs(neighbour_correlation(white)) < 0.05


def test_plain_noise_is_the_same_draw_every_step():
    timestep = torch.tensor([500.0, 900.0])
    plain = training_noise(2, (6, 8), timestep, 42, "cpu", multi_res=False)
    assert torch.equal(plain, fixed_seed_noise((2, 16, 6, 8), 42, "cpu"))
    assert torch.equal(plain, training_noise(2, (6, 8), timestep, 42, "cpu", multi_res=False))
    first_sample = torch.randn((1, 16, 6, 8), generator=torch.Generator().manual_seed(42))
    assert torch.equal(plain[:1], first_sample)  # the inference noise is the first sample's draw
    assert math.isclose(training_noise(2, (6, 8), timestep, 42, "cpu", True).std().item(), 1.0, rel_tol=1e-5)
