"""Model hyper-parameters read from weight shapes, cross-checked against an optional diffusers-style config.

Single-file checkpoints carry no config, so the DiT and VAE sizes are inferred from tensor shapes. The one thing
shapes cannot tell is how the DiT's head dimension is split into RoPE axes: FLUX uses (16, 56, 56); other sizes
need ``axes_dims_rope`` from a diffusers ``config.json``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CheckpointError, shortened
from .dit_keys import block_counts
from .io import load_config_json
from .vae_keys import vae_to_diffusers

__all__ = ["DiTArchitecture", "VAEArchitecture", "infer_dit_architecture", "infer_vae_architecture",
           "load_config_json"]

FLUX_AXES_DIMS_ROPE = (16, 56, 56)
DIFFUSERS_FLUX_MLP_RATIO = 4.0  # FluxTransformer2DModel has no mlp_ratio argument; its blocks hard-code 4


@dataclass(frozen=True)
class DiTArchitecture:
    hidden_size: int
    num_heads: int
    head_dim: int
    num_double_blocks: int
    num_single_blocks: int
    in_channels: int  # packed latent channels (16 latent channels x 2 x 2 patches = 64)
    out_channels: int
    text_dim: int  # T5 width
    pooled_dim: int  # CLIP pooled width
    guidance_embeds: bool
    mlp_ratio: float
    axes_dims_rope: tuple[int, ...] | None  # None: not FLUX's split and no config gave it (conversion still works)

    def to_diffusers_config(self) -> dict[str, Any]:
        """Keyword arguments for ``diffusers.FluxTransformer2DModel``."""
        if self.axes_dims_rope is None:
            raise CheckpointError(
                f"cannot infer the RoPE axes for head dim {self.head_dim} (FLUX's {FLUX_AXES_DIMS_ROPE} sum to "
                f"{sum(FLUX_AXES_DIMS_ROPE)}); pass a diffusers-style config.json with 'axes_dims_rope'"
            )
        if self.mlp_ratio != DIFFUSERS_FLUX_MLP_RATIO:
            raise CheckpointError(f"this DiT has MLP ratio {self.mlp_ratio}; diffusers' FluxTransformer2DModel "
                                  f"only supports {DIFFUSERS_FLUX_MLP_RATIO}")
        return {
            "patch_size": 1,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "num_layers": self.num_double_blocks,
            "num_single_layers": self.num_single_blocks,
            "attention_head_dim": self.head_dim,
            "num_attention_heads": self.num_heads,
            "joint_attention_dim": self.text_dim,
            "pooled_projection_dim": self.pooled_dim,
            "guidance_embeds": self.guidance_embeds,
            "axes_dims_rope": list(self.axes_dims_rope),
        }


@dataclass(frozen=True)
class VAEArchitecture:
    block_out_channels: tuple[int, ...]
    layers_per_block: int  # resnets per encoder level (the decoder has one more)
    latent_channels: int
    norm_num_groups: int = 32
    scaling_factor: float = 0.3611
    shift_factor: float | None = 0.1159
    in_channels: int = 3
    out_channels: int = 3
    use_quant_conv: bool = False  # Flux's ae has no quant convs; SD-style VAEs do
    use_post_quant_conv: bool = False
    mid_block_add_attention: bool = True

    def to_diffusers_config(self) -> dict[str, Any]:
        """Keyword arguments for ``diffusers.AutoencoderKL``."""
        levels = len(self.block_out_channels)
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": ["DownEncoderBlock2D"] * levels,
            "up_block_types": ["UpDecoderBlock2D"] * levels,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "latent_channels": self.latent_channels,
            "norm_num_groups": self.norm_num_groups,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "use_quant_conv": self.use_quant_conv,
            "use_post_quant_conv": self.use_post_quant_conv,
            "mid_block_add_attention": self.mid_block_add_attention,
        }


def infer_dit_architecture(sd_bfl: dict[str, torch.Tensor], config: dict[str, Any] | None = None) -> DiTArchitecture:
    """Read a BFL-named DiT's sizes from its shapes; ``config`` (diffusers keys) supplies RoPE axes and is checked.

    Without a config the axes are FLUX's (16, 56, 56) when they fit the head dim, else unknown (``None``): enough to
    convert or merge weights; building the model then asks for the config.
    """
    config = config or {}
    img_in = _shape(sd_bfl, "img_in.weight", 2)
    hidden, in_channels = img_in
    num_double, num_single = block_counts(list(sd_bfl), "bfl")
    q_norm = "double_blocks.0.img_attn.norm.query_norm" if num_double else "single_blocks.0.norm.query_norm"
    head_dim = _shape(sd_bfl, f"{q_norm}.scale", 1)[0]
    if hidden % head_dim:
        raise CheckpointError(f"hidden size {hidden} is not a multiple of the q/k norm size {head_dim}")
    if num_double:
        mlp_hidden = _shape(sd_bfl, "double_blocks.0.img_mlp.0.weight", 2)[0]
    else:
        mlp_hidden = _shape(sd_bfl, "single_blocks.0.linear1.weight", 2)[0] - 3 * hidden
    found = {
        "in_channels": in_channels,
        "out_channels": _shape(sd_bfl, "final_layer.linear.weight", 2)[0],
        "num_layers": num_double,
        "num_single_layers": num_single,
        "attention_head_dim": head_dim,
        "num_attention_heads": hidden // head_dim,
        "joint_attention_dim": _shape(sd_bfl, "txt_in.weight", 2)[1],
        "pooled_projection_dim": _shape(sd_bfl, "vector_in.in_layer.weight", 2)[1],
        "guidance_embeds": "guidance_in.in_layer.weight" in sd_bfl,
    }
    _check_hidden_size(sd_bfl, hidden, {"txt_in.weight": 0, "vector_in.in_layer.weight": 0,
                                        "final_layer.linear.weight": 1})
    _check_config(config, found, defaults={"out_channels": None})
    axes = _config_axes(config.get("axes_dims_rope"))
    if not axes:
        axes = FLUX_AXES_DIMS_ROPE if sum(FLUX_AXES_DIMS_ROPE) == head_dim else None
    elif sum(axes) != head_dim:
        raise CheckpointError(f"config axes_dims_rope={list(axes)} sums to {sum(axes)}, but the checkpoint's head dim "
                              f"is {head_dim}")
    if config.get("patch_size", 1) != 1:
        raise CheckpointError(f"config patch_size={config['patch_size']}: Flux checkpoints use patch_size 1")
    return DiTArchitecture(
        hidden_size=hidden, num_heads=found["num_attention_heads"], head_dim=head_dim, num_double_blocks=num_double,
        num_single_blocks=num_single, in_channels=in_channels, out_channels=found["out_channels"],
        text_dim=found["joint_attention_dim"], pooled_dim=found["pooled_projection_dim"],
        guidance_embeds=found["guidance_embeds"], mlp_ratio=mlp_hidden / hidden, axes_dims_rope=axes,
    )


def infer_vae_architecture(sd: dict[str, torch.Tensor], config: dict[str, Any] | None = None) -> VAEArchitecture:
    """Read a Flux-style VAE's sizes from its shapes (BFL or diffusers naming); ``config`` adds scale/shift/groups."""
    config = config or {}
    sd = vae_to_diffusers(sd)
    levels = 1 + max(int(key.split(".")[2]) for key in sd if key.startswith("encoder.down_blocks."))
    block_out = tuple(_shape(sd, f"encoder.down_blocks.{i}.resnets.0.conv1.weight", 4)[0] for i in range(levels))
    layers = 1 + max(int(key.split(".")[4]) for key in sd if key.startswith("encoder.down_blocks.0.resnets."))
    found = {
        "block_out_channels": list(block_out),
        "layers_per_block": layers,
        "latent_channels": _shape(sd, "decoder.conv_in.weight", 4)[1],
        "in_channels": _shape(sd, "encoder.conv_in.weight", 4)[1],
        "out_channels": _shape(sd, "decoder.conv_out.weight", 4)[0],
        "use_quant_conv": "quant_conv.weight" in sd,
        "use_post_quant_conv": "post_quant_conv.weight" in sd,
        "mid_block_add_attention": "encoder.mid_block.attentions.0.to_q.weight" in sd,
    }
    _check_config(config, found, defaults={})
    return VAEArchitecture(
        block_out_channels=block_out, layers_per_block=layers, latent_channels=found["latent_channels"],
        norm_num_groups=_config_groups(config.get("norm_num_groups", 32), block_out),
        scaling_factor=_config_number(config, "scaling_factor", 0.3611, nonzero=True),
        shift_factor=_config_number(config, "shift_factor", 0.1159, optional=True), in_channels=found["in_channels"],
        out_channels=found["out_channels"], use_quant_conv=found["use_quant_conv"],
        use_post_quant_conv=found["use_post_quant_conv"], mid_block_add_attention=found["mid_block_add_attention"],
    )


def _check_hidden_size(sd_bfl: dict[str, torch.Tensor], hidden: int, dims: dict[str, int]) -> None:
    """The projections into and out of the stream must all have ``img_in``'s hidden size (ComfyUI reads it from
    ``txt_in``): a checkpoint where they disagree is corrupt or mixed from two models."""
    for key, dim in dims.items():
        size = _shape(sd_bfl, key, 2)[dim]
        if size != hidden:
            raise CheckpointError(f"{key} has size {size} along dimension {dim}, but img_in.weight gives the hidden "
                                  f"size {hidden}: the checkpoint is corrupt or mixed from two models")


def _config_axes(value: Any) -> tuple[int, ...]:
    """``axes_dims_rope``: positive even integers (each axis rotates pairs of channels), or nothing given."""
    if value is None or (isinstance(value, (list, tuple)) and not value):
        return ()
    if not isinstance(value, (list, tuple)) or not all(_is_int(a) and a > 0 and a % 2 == 0 for a in value):
        raise CheckpointError(f"config axes_dims_rope={shortened(value)}; expected a list of positive even integers, "
                              f"e.g. [16, 56, 56]")
    return tuple(value)


def _config_groups(value: Any, block_out: tuple[int, ...]) -> int:
    """``norm_num_groups``: a positive integer dividing every level's channel count (GroupNorm's rule)."""
    if not _is_int(value) or value < 1 or any(channels % value for channels in block_out):
        raise CheckpointError(f"config norm_num_groups={shortened(value)}; expected a positive integer dividing the "
                              f"channel counts {list(block_out)}")
    return value


def _config_number(config: dict[str, Any], key: str, default: float, nonzero: bool = False,
                   optional: bool = False) -> float | None:
    """A finite number from ``config`` (``None`` allowed when ``optional``; zero refused when ``nonzero``)."""
    value = config.get(key, default)
    if value is None and optional:
        return None
    number = float("nan")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # a JSON integer beyond float's range
            pass
    if not math.isfinite(number) or (nonzero and number == 0):
        kind = "non-zero finite number" if nonzero else "finite number" + (" or null" if optional else "")
        raise CheckpointError(f"config {key}={shortened(value)}; expected a {kind}")
    return number


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_config(config: dict[str, Any], found: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Every config value the shapes also determine must agree (``defaults`` lists values meaning "as inferred")."""
    for key, value in found.items():
        if key not in config or (key in defaults and config[key] == defaults[key]):
            continue
        given = list(config[key]) if isinstance(config[key], (list, tuple)) else config[key]
        if given != value:
            raise CheckpointError(f"config says {key}={given!r}, but the checkpoint's shapes give {key}={value!r}")


def _shape(sd: dict[str, torch.Tensor], key: str, ndim: int) -> tuple[int, ...]:
    """The shape of ``sd[key]``, which must have ``ndim`` non-empty dimensions (a sizes-giving weight)."""
    if key not in sd:
        raise CheckpointError(f"missing key {key!r}: the checkpoint is incomplete or in another naming "
                              f"(convert DiTs to BFL naming with to_bfl first)")
    shape = tuple(sd[key].shape)
    if len(shape) != ndim or 0 in shape:
        raise CheckpointError(f"{key} has shape {list(shape)}; expected {ndim} non-empty dimensions (the checkpoint "
                              f"is corrupt or not a FLUX model)")
    return shape
