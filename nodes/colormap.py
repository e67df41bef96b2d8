"""A colour preview for depth: Google's Turbo colormap (polynomial fit by A. Mikhailov, Apache-2.0), so previews need
no matplotlib."""

import torch

# Coefficients of the degree-5 polynomials for R, G and B in x = 0..1 (constant term first).
_TURBO_COEFFICIENTS = (
    (0.13572138, 4.61539260, -42.66032258, 132.13108234, -152.94239396, 59.28637943),
    (0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604),
    (0.10667330, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973),
)


def turbo(values01: torch.Tensor) -> torch.Tensor:
    """[...] values in [0,1] -> [..., 3] RGB in [0,1]: dark blue (0) through green and yellow to dark red (1)."""
    x = values01.float().clamp(0, 1)
    powers = torch.stack([x**k for k in range(6)], dim=-1)  # [...,6]
    coefficients = torch.tensor(_TURBO_COEFFICIENTS, dtype=x.dtype, device=x.device)  # [3,6]
    return (powers @ coefficients.T).clamp(0, 1)
