"""The DiT's timestep sinusoid, in the variant the weights were trained with (E2P-SPEC §1.8).

DiffSynth (the reference) casts the 128 sinusoid frequencies to the timestep's dtype before multiplying
(``align_dtype_to_timestep``). Its runs are in bf16, so the released weights were fine-tuned with bf16-rounded
frequencies: at t = 1000 this moves 28 of the 128 cos/sin pairs by up to ~1.1 compared with the exact frequencies
that BFL, diffusers and ComfyUI use. Only the timestep embedder does this; the guidance embedder keeps float32.

Variants:
* ``reference`` -- round the frequencies to the compute dtype, exactly like the reference code (bf16 compute:
  rounded; float32 compute: exact). This reproduces the official pipeline at every dtype.
* ``bf16``      -- always round to bf16: how the released weights were trained, even when computing in float32.
* ``exact``     -- float32 frequencies, as BFL / diffusers / ComfyUI.

``auto`` (the default of the nodes and the CLI) runs the variant the weights record (``e2p.time_embedding``, written
by ``python -m train``), else ``bf16``: every known Edit2Perceive weight was trained with bf16-rounded frequencies, and
a record can be lost on the way (core ComfyUI LoRA loaders do not read safetensors metadata).
"""

import math
from typing import Literal

import torch

from .errors import InputError

TimeEmbedding = Literal["reference", "bf16", "exact"]
TIME_EMBEDDINGS: tuple[str, ...] = ("reference", "bf16", "exact")
AUTO = "auto"
TIME_EMBEDDING_CHOICES: tuple[str, ...] = (AUTO, *TIME_EMBEDDINGS)
UNRECORDED_TIME_EMBEDDING: TimeEmbedding = "bf16"  # how every known Edit2Perceive weight was trained
TIME_EMBEDDING_HELP = ("timestep-frequency variant: 'auto' = what the weights record (python -m train writes it), "
                       "else 'bf16' (bf16-rounded frequencies, how every released Edit2Perceive weight was trained); "
                       "'reference' = rounded to the compute dtype as the official code; 'exact' = float32 "
                       "frequencies as ComfyUI/BFL")
SINUSOID_CHANNELS = 256
MAX_PERIOD = 10000


def check_time_embedding(variant: str) -> TimeEmbedding:
    if variant not in TIME_EMBEDDINGS:
        raise InputError(f"time embedding variant must be one of {TIME_EMBEDDINGS}, got {variant!r}")
    return variant  # type: ignore[return-value]


def resolve_time_embedding(requested: str | None, recorded: TimeEmbedding | None) -> TimeEmbedding:
    """The variant to run: ``requested``, or for ``auto`` (or None) the ``recorded`` one, else bf16."""
    if requested in (None, AUTO):
        return recorded or UNRECORDED_TIME_EMBEDDING
    return check_time_embedding(requested)


def sinusoid_frequencies(variant: TimeEmbedding, compute_dtype: torch.dtype, device=None) -> torch.Tensor:
    """The 128 frequencies ``exp(-ln(10000) * k / 128)``, float32, rounded as ``variant`` says."""
    half = SINUSOID_CHANNELS // 2
    exponent = -math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=device) / half
    frequencies = torch.exp(exponent)
    rounding_dtype = {"reference": compute_dtype, "bf16": torch.bfloat16, "exact": torch.float32}[variant]
    return frequencies.to(rounding_dtype).float()


def timestep_sinusoid(timestep: torch.Tensor, frequencies: torch.Tensor) -> torch.Tensor:
    """[B] timesteps in E2P units (0..1000) -> [B,256] float32, cos first (``flip_sin_to_cos``)."""
    angles = timestep[:, None].float() * frequencies[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
