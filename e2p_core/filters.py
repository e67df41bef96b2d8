"""The Gaussian-derivative gradient used by the matting Grad metric and the matting consistency loss.

This is the filter of the Deep Image Matting evaluation code (σ = 1.4, ε = 0.01, a 9×9 kernel, L2-normalised) that the
matting literature reports Grad with; E2P's evaluation and training loss use the same one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

GRAD_SIGMA = 1.4
GRAD_EPSILON = 1e-2


def gaussian_derivative_kernels(
    sigma: float = GRAD_SIGMA, epsilon: float = GRAD_EPSILON
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kernel_x, kernel_y)``, float64 ``[K, K]``: ``G(row)·G'(col)`` and its transpose, normalised to unit L2 norm.

    The half size is where the Gaussian falls below ``epsilon`` of its peak density: 4 for σ = 1.4, so K = 9.
    """
    half = math.ceil(sigma * math.sqrt(-2 * math.log(math.sqrt(2 * math.pi) * sigma * epsilon)))
    u = torch.arange(-half, half + 1, dtype=torch.float64)
    gauss = torch.exp(-(u**2) / (2 * sigma**2)) / (sigma * math.sqrt(2 * math.pi))
    dgauss = -u * gauss / sigma**2
    kernel_x = gauss[:, None] * dgauss[None, :]
    kernel_x = kernel_x / kernel_x.pow(2).sum().sqrt()
    return kernel_x, kernel_x.T.contiguous()


def gaussian_gradient_magnitude(
    image: torch.Tensor,
    padding: str = "replicate",
    sigma: float = GRAD_SIGMA,
    epsilon: float = GRAD_EPSILON,
    eps_sqrt: float = 0.0,
) -> torch.Tensor:
    """``|∇_G image|`` for ``image`` ``[B, H, W]`` (any float dtype; differentiable), same shape.

    ``padding``: ``"replicate"`` matches scipy ``convolve(mode="nearest")`` of the metric; ``"zeros"`` matches the
    reference training loss's ``same`` zero padding. The kernels are applied as a true convolution (flipped), like
    scipy. ``eps_sqrt`` is added under the square root: a loss needs it > 0 for a finite gradient where the image is
    flat.
    """
    if padding not in ("replicate", "zeros"):
        raise ValueError(f"padding must be 'replicate' or 'zeros', got {padding!r}")
    kernel_x, kernel_y = gaussian_derivative_kernels(sigma, epsilon)
    kernels = torch.stack([kernel_x, kernel_y]).flip(-1, -2)[:, None].to(image)  # [2,1,K,K]; flipped: convolution
    half = kernels.shape[-1] // 2
    x = image[:, None]  # [B,1,H,W]
    x = F.pad(x, (half,) * 4, mode="replicate") if padding == "replicate" else F.pad(x, (half,) * 4)
    gradients = F.conv2d(x, kernels)  # [B,2,H,W]
    return (gradients.pow(2).sum(1) + eps_sqrt).sqrt()
