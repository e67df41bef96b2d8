"""Training noise: the reference's fixed-seed Gaussian, optionally with annealed multi-resolution components.

The reference re-seeds its noise generator with the same seed on every step (E2P-SPEC §4.3), so the base Gaussian is
the same draw for a given batch shape, as the fixed-seed noise inference starts from. ``--multi-res-noise`` adds
Marigold's pyramid of upsampled coarse Gaussians with per-sample strength ``0.9 * t / 1000``: strong at high noise
levels, vanishing near t = 0.
"""

import torch
import torch.nn.functional as F

from e2p_core.schedule import LATENT_CHANNELS

MULTI_RES_LEVELS = 10
MULTI_RES_STRENGTH = 0.9  # s_b = 0.9 * t_b / 1000


def fixed_seed_noise(shape: tuple[int, ...], seed: int, device: torch.device | str) -> torch.Tensor:
    """``randn(shape)`` in float32 from a generator freshly seeded with ``seed`` on ``device``."""
    generator = torch.Generator(device).manual_seed(int(seed))
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)


def multi_res_strength(timestep: torch.Tensor) -> torch.Tensor:
    """Per-sample strength ``0.9 * t / 1000`` computed in the timestep's dtype (bf16 in the reference), float32 [B]."""
    return (timestep * MULTI_RES_STRENGTH / 1000).float()


def multi_res_noise(
    shape: tuple[int, int, int, int], strength: torch.Tensor, seed: int, device: torch.device | str
) -> torch.Tensor:
    """Marigold's ``multi_res_noise_like`` with a freshly seeded generator: float32 [B,C,h,w] with global std 1.

    Level i adds ``upsample(randn at size/r^i) * strength^i`` with ``r ~ U[2,4)`` drawn from the same generator; the
    size shrinks cumulatively and the loop stops once a side reaches 1. ``strength`` is [B] (one per sample).
    """
    batch, channels, height, width = shape
    generator = torch.Generator(device).manual_seed(int(seed))
    noise = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    weight = strength.to(device=device, dtype=torch.float32).view(batch, 1, 1, 1)
    level_h, level_w = height, width
    for level in range(MULTI_RES_LEVELS):
        ratio = float(torch.rand(1, generator=generator, device=device)) * 2 + 2
        level_h, level_w = max(1, int(level_h / ratio**level)), max(1, int(level_w / ratio**level))
        coarse = torch.randn(batch, channels, level_h, level_w, generator=generator, device=device)
        noise = noise + F.interpolate(coarse, size=(height, width), mode="bilinear") * weight**level
        if level_h == 1 or level_w == 1:
            break
    return noise / noise.std()


def training_noise(
    batch: int, latent_hw: tuple[int, int], timestep: torch.Tensor, seed: int, device: torch.device | str,
    multi_res: bool,
) -> torch.Tensor:
    """The noise ε of one training step, float32 [B,16,h,w]."""
    shape = (batch, LATENT_CHANNELS, *latent_hw)
    if multi_res:
        return multi_res_noise(shape, multi_res_strength(timestep), seed, device)
    return fixed_seed_noise(shape, seed, device)
