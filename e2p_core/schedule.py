"""Noise, sigmas and the update rule of the reference flow-matching sampler (E2P-SPEC §1.6-§1.7).

The reference ``FlowMatchScheduler`` uses a *static* shift of 3 on ``linspace(1, sigma_min, N)`` with
``sigma_min = 0.003/1.002`` and no resolution-dependent shift. Timesteps are in E2P units, ``1000 * sigma``.

* 1 step (the paper's setting): the DiT runs once at t = 1000 and the update is ``z + (sigma_last - 1) * v`` where
  ``sigma_last`` is the last sigma of the 1000-point training grid (0.00892857), so the factor is -0.99107143, not -1.
* N >= 2 steps: Euler on the shifted N-point grid, ending at sigma = 0.

FE2E (Step1X-Edit) has its own schedule, :func:`fe2e_timesteps`: BFL's resolution-shifted grid.

Sigmas are float32 *tensors* with a dimension: a 0-d float32 scalar times a bf16 tensor stays bf16 in PyTorch,
whereas the reference's dimensioned float32 sigmas promote the product to float32.
"""

import math
from dataclasses import dataclass

import torch

from .errors import InputError

SHIFT = 3.0
SIGMA_MIN = 0.003 / 1.002
TRAINING_GRID_SIZE = 1000
LATENT_CHANNELS = 16
MAX_STEPS = 1000


def shifted_sigmas(num_points: int) -> torch.Tensor:
    """The reference grid ``3s / (1 + 2s)`` over ``s = linspace(1, sigma_min, num_points)``, float32 [num_points]."""
    sigma_start = SIGMA_MIN + (1.0 - SIGMA_MIN) * 1.0  # the reference's denoising_strength = 1 arithmetic
    s = torch.linspace(sigma_start, SIGMA_MIN, num_points)
    return SHIFT * s / (1 + (SHIFT - 1) * s)


@dataclass(frozen=True)
class Schedule:
    """What the sampler does at each step.

    ``timesteps[i]`` (E2P units, float32) is what the DiT sees at step i, cast to the model dtype by the caller.
    ``sigmas`` has one more entry than ``timesteps``: step i moves the latent by ``v * (sigmas[i+1] - sigmas[i])``.
    For the 1-step path ``sigmas = [1, sigma_last]``, which makes that same rule the reference's special update.
    """

    timesteps: torch.Tensor  # float32 [steps], 1000 * sigma
    sigmas: torch.Tensor  # float32 [steps + 1]


def make_schedule(steps: int) -> Schedule:
    if not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise InputError(f"steps must be an integer in [1, {MAX_STEPS}], got {steps!r}")
    if steps == 1:
        grid = shifted_sigmas(TRAINING_GRID_SIZE)
        # getsigmas(1000 - t) at t = 1000 picks the grid point nearest to timestep 0: the last one.
        return Schedule(timesteps=grid[:1] * TRAINING_GRID_SIZE, sigmas=torch.stack([grid[0], grid[-1]]))
    sigmas = shifted_sigmas(steps)
    return Schedule(timesteps=sigmas * TRAINING_GRID_SIZE, sigmas=torch.cat([sigmas, torch.zeros(1)]))


def euler_step(latent: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor):
    """``latent + velocity * (sigma_next - sigma)`` with float32 sigmas of shape [1]: the result is float32."""
    return latent + velocity * (sigma_next - sigma)


def initial_noise(latent_hw: tuple[int, int], seed: int, device: torch.device | str) -> torch.Tensor:
    """The reference noise: ``randn`` in float32 from ``torch.Generator(device).manual_seed(seed)``, [1,16,h,w].

    The generator lives on the compute device, as in the reference (its shipped callers use CUDA, so CPU noise for
    the same seed differs from the official GPU results; pass the noise explicitly to reproduce those).
    """
    generator = torch.Generator(device).manual_seed(int(seed))
    return torch.randn((1, LATENT_CHANNELS, *latent_hw), generator=generator, device=device, dtype=torch.float32)


# FE2E / Step1X-Edit (BFL ``get_schedule``): mu grows linearly with the token count through these two points.
FE2E_SHIFT_POINTS = ((256, 0.5), (4096, 1.15))


def fe2e_timesteps(steps: int, image_tokens: int) -> list[float]:
    """FE2E's ``steps + 1`` times from 1 to 0, shifted for ``image_tokens`` target tokens, as Python floats.

    ``t' = e^mu / (e^mu + (1/t - 1))`` evaluated exactly as the reference does, float32 tensor ops included:
    PyTorch computes ``scalar / tensor`` as reciprocal-then-multiply, so the first time is 0.99999994 rather than
    1.0 for some token counts, and the DiT sees that value.
    """
    if not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise InputError(f"steps must be an integer in [1, {MAX_STEPS}], got {steps!r}")
    (x1, y1), (x2, y2) = FE2E_SHIFT_POINTS
    slope = (y2 - y1) / (x2 - x1)
    mu = slope * image_tokens + (y1 - slope * x1)
    times = torch.linspace(1, 0, steps + 1)
    shifted = math.exp(mu) / (math.exp(mu) + (1 / times - 1) ** 1.0)
    return shifted.tolist()
