"""Kontext token layout: 2x2 latent packing and the 3-axis RoPE position ids (E2P-SPEC §1.5).

The image stream is ``[target | context_1 | context_2 ...]``. Target tokens get ids (0, row, col); EVERY context image
gets (1, row, col) -- the matting point map shares the RGB's ids exactly (no spatial offset, no index 2), which is
what the released weights were trained with. Text tokens get (0, 0, 0).
"""

import torch
from einops import rearrange

TARGET_INDEX = 0
CONTEXT_INDEX = 1


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B,C,h,w] -> [B,(h/2)(w/2),4C], channel-major (c, p, q) like diffusers ``_pack_latents`` and BFL."""
    return rearrange(latents, "b c (h p) (w q) -> b (h w) (c p q)", p=2, q=2)


def unpack_tokens(tokens: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`pack_latents`: [B,(h/2)(w/2),4C] -> [B,C,h,w]."""
    h, w = latent_hw
    return rearrange(tokens, "b (h w) (c p q) -> b c (h p) (w q)", h=h // 2, w=w // 2, p=2, q=2)


def position_ids(latent_hw: tuple[int, int], index: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """RoPE ids (index, row, col) of the tokens of one latent image, row-major, [(h/2)(w/2), 3].

    Built in the model dtype as the reference does; bf16 represents the coordinates exactly up to 256 (4096 px).
    """
    rows, cols = latent_hw[0] // 2, latent_hw[1] // 2
    ids = torch.zeros(rows, cols, 3, device=device)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(rows, device=device)[:, None]
    ids[..., 2] = torch.arange(cols, device=device)[None, :]
    return ids.reshape(rows * cols, 3).to(dtype)


def pack_context(
    context_latents: list[torch.Tensor], dtype: torch.dtype, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The context half of the sequence and the ids of the whole sequence ``[target | contexts]``.

    ``context_latents``: one ``[B,C,h,w]`` latent per context image (the RGB, then the matting point map); the target
    has the same ``h,w``. Returns ``(context tokens [B,M,4C], ids [N+M,3])`` with N = (h/2)(w/2) target tokens.
    """
    latent_hw = tuple(context_latents[0].shape[-2:])
    context_tokens = torch.cat([pack_latents(latent) for latent in context_latents], dim=1)
    target_ids = position_ids(latent_hw, TARGET_INDEX, dtype, device)
    context_ids = position_ids(latent_hw, CONTEXT_INDEX, dtype, device).repeat(len(context_latents), 1)
    return context_tokens, torch.cat([target_ids, context_ids])
