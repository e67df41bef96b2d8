"""The flow-matching objective of Edit2Perceive training (E2P-SPEC §4.2, §4.8).

* Timesteps: an index drawn uniformly from the 1000-point shift-3 grid of ``e2p_core.schedule`` (biased toward high
  noise), cast to the model dtype as the reference does; sigma and the loss weight then belong to the grid point
  nearest to that (rounded) timestep.
* Path: ``x_t = (1 - σ) z1 + σ ε`` with target velocity ``v = ε - z1``.
* Loss: ``L_FM = mean_b[ w(t_b) · mean_{c,h,w}(M ⊙ (v̂ - v)²) ]`` with the "bell" weight ``w`` (mean 1 over the grid)
  and ``M`` the valid mask at latent resolution (masked pixels are zeroed; the mean still divides by all of them).
* The clean estimate for the pixel-space consistency loss is the reference's ``x̂0 = x_t + (σ̃(1000 - t) - 1)·v̂``;
  at t = 1000 this is exactly the one-step update inference makes (factor -0.99107).
* The adaptive λ of the paper: ``λ = sg|L_FM| / (sg|L_Cons| + 1e-3) · max(0, step / N_epoch - start_epoch)``.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from e2p_core.schedule import TRAINING_GRID_SIZE, shifted_sigmas

GRID_SIGMAS = shifted_sigmas(TRAINING_GRID_SIZE)  # float32 [1000], from 1 down to 0.00892857
GRID_TIMESTEPS = GRID_SIGMAS * TRAINING_GRID_SIZE  # E2P units
LAMBDA_EPSILON = 1e-3


def bell_weights() -> torch.Tensor:
    """The reference's per-timestep loss weight over the grid, float32 [1000], mean 1.

    ``y = exp(-2 ((t - 500) / 1000)²)``, ``w = (y - min y) · 1000 / Σ (y - min y)``.
    """
    y = torch.exp(-2 * ((GRID_TIMESTEPS - TRAINING_GRID_SIZE / 2) / TRAINING_GRID_SIZE) ** 2)
    shifted = y - y.min()
    return shifted * TRAINING_GRID_SIZE / shifted.sum()


GRID_WEIGHTS = bell_weights()


def nearest_grid_index(timestep: torch.Tensor) -> torch.Tensor:
    """Index [B] of the grid timestep nearest to each ``timestep`` (any dtype; compared in float32)."""
    grid = GRID_TIMESTEPS.to(timestep.device)
    return (grid[None, :] - timestep.float()[:, None]).abs().argmin(dim=1)


@dataclass
class TimestepBatch:
    """One training step's noise levels, one per sample."""

    timestep: torch.Tensor  # [B] model dtype, E2P units: what the DiT sees
    sigma: torch.Tensor  # [B] float32: the grid sigma of that timestep
    weight: torch.Tensor  # [B] float32: the bell weight of that timestep


def sample_timesteps(batch: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device | str
                     ) -> TimestepBatch:
    """Uniform grid indices from ``generator`` (a CPU generator whose state the trainer checkpoints)."""
    drawn = torch.randint(0, TRAINING_GRID_SIZE, (batch,), generator=generator)
    timestep = GRID_TIMESTEPS[drawn].to(dtype)  # rounded like the reference's bf16 cast
    index = nearest_grid_index(timestep)
    return TimestepBatch(timestep.to(device), GRID_SIGMAS[index].to(device), GRID_WEIGHTS[index].to(device))


def noisy_latent(clean: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - σ) z1 + σ ε`` per sample, float32."""
    s = sigma.float().view(-1, 1, 1, 1)
    return (1 - s) * clean.float() + s * noise.float()


def target_velocity(clean: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``v = ε - z1``, float32."""
    return noise.float() - clean.float()


def latent_mask(valid: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Pixel validity [B,H,W] (bool) -> float [B,1,h,w], nearest-downsampled like the reference."""
    return F.interpolate(valid[:, None].float(), size=latent_hw, mode="nearest")


def flow_matching_loss(velocity: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """``mean_b[ w_b · mean_{c,h,w}(M ⊙ (v̂ - v)²) ]`` in float32; ``mask`` [B,1,h,w] or None."""
    squared = (velocity.float() - target.float()).square()
    if mask is not None:
        squared = squared * mask
    return (squared.mean(dim=(1, 2, 3)) * weight.float()).mean()


def clean_estimate(noisy: torch.Tensor, velocity: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """The reference's ``x̂0 = x_t + (σ̃(1000 - t) - 1)·v̂``, float32, differentiable in ``velocity`` only.

    ``σ̃(1000 - t)`` is the grid sigma nearest to timestep ``1000 - t`` (computed in t's dtype), about ``1 - σ_t``,
    so ``x̂0 ≈ x_t - σ_t v̂``.
    """
    mirrored = TRAINING_GRID_SIZE - timestep  # in the timestep's dtype, like the reference
    factor = GRID_SIGMAS.to(noisy.device)[nearest_grid_index(mirrored)] - 1  # [B] float32
    return noisy.detach().float() + factor.view(-1, 1, 1, 1) * velocity.float()


def consistency_ramp(step: int, steps_per_epoch: float, start_epoch: float = 1.0) -> float:
    """``max(0, step / N_epoch - start_epoch)``: 0 for the first ``start_epoch`` epochs, then a linear ramp."""
    return max(0.0, step / steps_per_epoch - start_epoch)


def adaptive_lambda(loss_fm: torch.Tensor, loss_consistency: torch.Tensor, ramp: float) -> float:
    """``sg|L_FM| / (sg|L_Cons| + 1e-3) · ramp``: a plain float, so no gradient flows through λ."""
    if ramp == 0:
        return 0.0
    return abs(float(loss_fm.detach())) / (abs(float(loss_consistency.detach())) + LAMBDA_EPSILON) * ramp
