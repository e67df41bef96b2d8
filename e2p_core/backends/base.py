"""The seam between the Edit2Perceive algorithm and a model runtime.

A backend supplies a :class:`Denoiser` (the Flux DiT: velocity of the image tokens) and a :class:`LatentCodec`
(the Flux VAE with its shift and scale). Both work in one compute ``dtype`` on one ``device``; the pipeline does
every cast the reference does around them.
"""

from typing import Protocol

import torch

from ..prompts import PromptEmbeddings


class Denoiser(Protocol):
    dtype: torch.dtype
    device: torch.device

    def __call__(
        self,
        tokens: torch.Tensor,  # [B,N,64] image stream [target | context...], dtype
        ids: torch.Tensor,  # [N,3] RoPE ids of the image stream, dtype
        timestep: torch.Tensor,  # [B] E2P units (1000 * sigma), dtype
        guidance: torch.Tensor,  # [B] guidance scale (1.0 for Edit2Perceive), dtype
        prompt: PromptEmbeddings,  # on device, dtype
    ) -> torch.Tensor:  # [B,N,64] velocity of every image token
        ...


class LatentCodec(Protocol):
    dtype: torch.dtype
    device: torch.device

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [-1,1], dtype -> posterior mean after shift and scale, [B,16,H/8,W/8], dtype."""
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[B,16,h,w], dtype -> raw decoder output [B,3,8h,8w], dtype (unscale and unshift happen inside)."""
        ...
