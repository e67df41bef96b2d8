"""FE2E's text conditioning: Step1X-Edit's ``Qwen2Connector`` over the cached empty-prompt Qwen2.5-VL embedding.

FE2E is evaluated with an EMPTY prompt, so Qwen2.5-VL never runs: its last hidden states for that prompt are cached
once in ``no_info.npz`` (``embeds`` [L,3584] float32, ``masks`` [L] int64, 1 = real token). At every DiT call the
connector (weights ``connector.*`` in the Step1X-Edit checkpoint) turns that cache and the timestep into

* ``txt`` [B,L,4096]: the DiT's text tokens (every row, padding included, enters the DiT), and
* ``y`` [B,768]: the pooled vector feeding the DiT's ``vector_in``.

How (AMAP-ML/FE2E ``modules/connector_edit.py``), with ``mean`` the mask-weighted mean over the rows:

    y = global_proj_out(mean(text) * (1 + scale_factor))
    c = t_embedder(sinusoid(1000 t)) + c_embedder(mean(text))            # adaLN conditioning of the refiner
    h = input_embedder(text)
    per refiner block:  h += gate_msa * proj(SDPA(LN1(h) -> qkv, mask));  h += gate_mlp * MLP_silu(LN2(h))
    with (gate_msa, gate_mlp) = Linear(SiLU(c)), the attention mask ``mask_i & mask_j`` with column 0 always on.

Dtypes follow the reference's autocast: the cache stays float32 and the masked means are float32; every Linear and
the attention run in the compute dtype (``Linear(x.to(dtype))``), LayerNorm and SiLU in their input's dtype.

Pure torch (no diffusers): the ComfyUI nodes use it too.
"""

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError, InputError

CONNECTOR_PREFIX = "connector."
QWEN_HEAD_DIM = 128  # Step1X-Edit's connector: 4096 wide, 32 heads
SINUSOID_CHANNELS = 256
MAX_PERIOD = 10000
LAYER_NORM_EPS = 1e-6
TIME_FACTOR = 1000.0


@dataclass(frozen=True)
class ConnectorArchitecture:
    in_channels: int  # Qwen2.5-VL hidden size (3584)
    hidden_size: int  # the DiT's text width (context_in_dim, 4096)
    num_attention_heads: int
    depth: int  # refiner blocks
    mlp_ratio: float
    pooled_dim: int  # the DiT's vec_in_dim (768)


@dataclass
class PromptCache:
    """The cached Qwen2.5-VL embedding of the empty prompt (``no_info.npz``)."""

    embeds: torch.Tensor  # float32 [1,L,D]
    mask: torch.Tensor  # int64 [1,L], 1 = real token

    def to(self, device: torch.device | str | None = None) -> "PromptCache":
        return PromptCache(self.embeds.to(device), self.mask.to(device))


def load_prompt_cache(path: str | Path) -> PromptCache:
    """Read ``no_info.npz`` (``embeds`` [L,D] float, ``masks`` [L] integer 0/1) and check it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"prompt cache {str(path)!r} does not exist; FE2E needs its empty-prompt embedding "
                         f"'no_info.npz' (from the FE2E repository, latent/no_info.npz)")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except Exception as exc:  # numpy's and zipfile's parsers fail on a damaged file with whatever error they meet
        raise InputError(f"prompt cache {path.name!r} is not a readable .npz file: {type(exc).__name__}: "
                         f"{str(exc)[:200]}") from None
    missing = [key for key in ("embeds", "masks") if key not in arrays]
    if missing:
        raise InputError(f"prompt cache {path.name!r} lacks {missing}; it has {sorted(arrays)} (expected 'embeds' "
                         f"[L,D] and 'masks' [L], as FE2E's latent/no_info.npz)")
    embeds, masks = arrays["embeds"], arrays["masks"]
    if embeds.ndim == 3 and embeds.shape[0] == 1:
        embeds = embeds[0]
    if masks.ndim == 2 and masks.shape[0] == 1:
        masks = masks[0]
    if embeds.ndim != 2 or not np.issubdtype(embeds.dtype, np.floating):
        raise InputError(f"prompt cache {path.name!r}: 'embeds' is {embeds.dtype} {list(embeds.shape)}; "
                         f"expected float [L,D]")
    if masks.shape != embeds.shape[:1] or not (np.issubdtype(masks.dtype, np.integer) or masks.dtype == bool):
        raise InputError(f"prompt cache {path.name!r}: 'masks' is {masks.dtype} {list(masks.shape)}; expected "
                         f"integer [{embeds.shape[0]}] (one 0/1 per row of 'embeds')")
    embeds = embeds.astype(np.float32)  # what the connector computes with: float64 beyond its range is infinite
    if not np.isfinite(embeds).all():
        raise InputError(f"prompt cache {path.name!r}: 'embeds' has NaN or infinite values (in float32)")
    if not np.isin(masks, (0, 1)).all() or not masks.any():
        raise InputError(f"prompt cache {path.name!r}: 'masks' must be 0/1 with at least one 1")
    return PromptCache(torch.from_numpy(embeds)[None],
                       torch.from_numpy(masks.astype(np.int64))[None])


def split_connector(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A Step1X-Edit checkpoint -> (DiT tensors, connector tensors without the ``connector.`` prefix)."""
    connector = {key[len(CONNECTOR_PREFIX):]: value for key, value in state_dict.items()
                 if key.startswith(CONNECTOR_PREFIX)}
    dit = {key: value for key, value in state_dict.items() if not key.startswith(CONNECTOR_PREFIX)}
    return dit, connector


def infer_connector_architecture(state_dict: dict[str, torch.Tensor], config: dict[str, Any] | None = None
                                 ) -> ConnectorArchitecture:
    """Sizes from the shapes; the head count (which shapes cannot tell) from ``config`` or Step1X's head dim 128."""
    config = {} if config is None else config
    if not isinstance(config, dict):
        raise CheckpointError(f"config 'connector' must be an object ({{\"num_attention_heads\": 32, ...}}), got "
                              f"{type(config).__name__}")
    try:
        hidden, in_channels = state_dict["S.input_embedder.weight"].shape
        mlp_hidden = state_dict["S.individual_token_refiner.blocks.0.mlp.fc1.weight"].shape[0]
        pooled = state_dict["global_proj_out.weight"].shape[0]
    except KeyError as exc:
        raise CheckpointError(f"the Step1X-Edit connector is incomplete: missing connector.{exc.args[0]}") from None
    depth = 1 + max(int(key.split(".")[3]) for key in state_dict if key.startswith("S.individual_token_refiner."))
    found = {"in_channels": in_channels, "hidden_size": hidden, "depth": depth, "mlp_ratio": mlp_hidden / hidden}
    for key, value in found.items():
        if key in config and config[key] != value:
            raise CheckpointError(f"connector config says {key}={config[key]!r}, but the checkpoint's shapes give "
                                  f"{key}={value!r}")
    heads = config.get("num_attention_heads", max(1, hidden // QWEN_HEAD_DIM))
    if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1 or hidden % heads:
        raise CheckpointError(f"connector config num_attention_heads={heads!r}: expected a positive integer dividing "
                              f"the connector width {hidden}")
    return ConnectorArchitecture(in_channels, hidden, heads, depth, mlp_hidden / hidden, pooled)


def masked_mean(text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real rows, [B,L,D] float32 x [B,L] int -> [B,D] float32 (the reference's int64 weights)."""
    weights = mask.unsqueeze(-1)
    return (text * weights).sum(dim=1) / weights.sum(dim=1)


def time_sinusoid(timestep: torch.Tensor) -> torch.Tensor:
    """[B] timesteps (already x1000) -> [B,256] float32, cos first, exact float32 frequencies."""
    half = SINUSOID_CHANNELS // 2
    frequencies = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32) / half)
    angles = timestep[:, None].float() * frequencies.to(timestep.device)[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class _Embedder(nn.Module):
    """Linear -> SiLU -> Linear; parameter names are the reference's (``mlp.0``/``mlp.2`` or ``linear_1/2``)."""

    def __init__(self, first: str, second: str, in_dim: int, hidden: int):
        super().__init__()
        self.names = (first, second)
        self.add_module(first, nn.Linear(in_dim, hidden))
        self.add_module(second, nn.Linear(hidden, hidden))

    def forward(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        first, second = (getattr(self, name) for name in self.names)
        return second(F.silu(first(x.to(dtype))).to(dtype))


class _TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(SINUSOID_CHANNELS, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.mlp(time_sinusoid(timestep).to(dtype))


class _RefinerBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)
        self.self_attn_qkv = nn.Linear(hidden, 3 * hidden)
        self.self_attn_proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)
        mlp_hidden = int(hidden * mlp_ratio)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(hidden, mlp_hidden)
        self.mlp.fc2 = nn.Linear(mlp_hidden, hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, h: torch.Tensor, c: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        gate_msa, gate_mlp = self.adaLN_modulation(c).chunk(2, dim=1)  # each [B,hidden]
        qkv = self.self_attn_qkv(self.norm1(h))  # [B,L,3*hidden]
        q, k, v = qkv.unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)  # each [B,heads,L,head_dim]
        attention = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        attention = attention.transpose(1, 2).flatten(2)  # [B,L,hidden]
        h = h + self.self_attn_proj(attention) * gate_msa.unsqueeze(1)
        mlp = self.mlp.fc2(F.silu(self.mlp.fc1(self.norm2(h))))
        return h + mlp * gate_mlp.unsqueeze(1)


class Qwen2Connector(nn.Module):
    """Step1X-Edit's connector; ``load_state_dict`` takes the checkpoint's ``connector.*`` tensors unprefixed."""

    def __init__(self, arch: ConnectorArchitecture):
        super().__init__()
        self.arch = arch
        self.S = nn.Module()
        self.S.input_embedder = nn.Linear(arch.in_channels, arch.hidden_size)
        self.S.t_embedder = _TimestepEmbedder(arch.hidden_size)
        self.S.c_embedder = _Embedder("linear_1", "linear_2", arch.in_channels, arch.hidden_size)
        self.S.individual_token_refiner = nn.Module()
        self.S.individual_token_refiner.blocks = nn.ModuleList(
            _RefinerBlock(arch.hidden_size, arch.num_attention_heads, arch.mlp_ratio) for _ in range(arch.depth))
        self.global_proj_out = nn.Linear(arch.in_channels, arch.pooled_dim)
        self.scale_factor = nn.Parameter(torch.zeros(1))

    def forward(self, text: torch.Tensor, timestep: torch.Tensor, mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """text float32 [B,L,D], timestep [B] in the compute dtype and already x1000, mask int [B,L]
        -> (txt [B,L,hidden], y [B,pooled]) in the compute dtype."""
        if text.shape[-1] != self.arch.in_channels:
            raise InputError(f"the prompt cache holds {text.shape[-1]}-wide embeddings; this checkpoint's connector "
                             f"takes {self.arch.in_channels} (Qwen2.5-VL-7B's 3584 for Step1X-Edit)")
        dtype = self.global_proj_out.weight.dtype
        mean = masked_mean(text, mask)  # float32 [B,D]
        pooled = self.global_proj_out((mean * (1 + self.scale_factor.to(text.dtype))).to(dtype))  # [B,pooled]

        refiner = self.S
        c = refiner.t_embedder(timestep, dtype) + refiner.c_embedder(mean, dtype)  # [B,hidden]
        h = refiner.input_embedder(text.to(dtype))  # [B,L,hidden]
        for block in refiner.individual_token_refiner.blocks:
            h = block(h, c, refiner_attention_mask(mask))
        return h, pooled


def refiner_attention_mask(mask: torch.Tensor) -> torch.Tensor:
    """[B,L] 0/1 -> bool [B,1,L,L]: row i attends to column j when both are real tokens; column 0 is always on, so
    padding rows never see an all-masked row (which would give NaN)."""
    both = (mask[:, None, :, None] & mask[:, None, None, :]).bool()
    both[:, :, :, 0] = True
    return both


def build_connector(state_dict: dict[str, torch.Tensor], arch: ConnectorArchitecture, dtype: torch.dtype,
                    device: torch.device | str) -> Qwen2Connector:
    with torch.device("meta"):
        connector = Qwen2Connector(arch)
    weights = {key: value.to(device=device, dtype=dtype) for key, value in state_dict.items()}
    missing, unexpected = connector.load_state_dict(weights, strict=False, assign=True)
    if missing or unexpected:
        raise CheckpointError(f"the connector weights do not fit Step1X-Edit's Qwen2Connector: missing "
                              f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    return connector.eval().requires_grad_(False)
