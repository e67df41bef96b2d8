"""Flux VAE state-dict conversion: BFL ``ae.safetensors`` naming <-> diffusers ``AutoencoderKL`` naming.

Differences besides names: the BFL decoder numbers its levels from the lowest resolution up (``decoder.up.{i}`` is
diffusers ``decoder.up_blocks.{n-1-i}``), and the mid-block attention q/k/v/proj_out are 1x1 convs [C,C,1,1] in
BFL but Linear [C,C] in diffusers. Level and resnet counts come from the keys; every key must be mapped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal
from collections.abc import Callable

import torch

from ..errors import CheckpointError

VAEFormat = Literal["bfl", "diffusers"]
# Wrappers seen around VAE weights: SD-style single files and pipeline-style dumps.
VAE_PREFIXES = ("first_stage_model.", "vae.", "ae.")

_BFL_MARKER = re.compile(r"^(encoder|decoder)\.(down|up|mid)\.")
_BFL_ATTN_PROJECTION = re.compile(r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")
_DIFFUSERS_MARKER = re.compile(r"^(encoder|decoder)\.(down_blocks|up_blocks|mid_block)\.")

# One table for both directions: (BFL template, diffusers template). Each {field} is described in _FIELDS.
_KEY_TEMPLATES = [
    ("{side}.conv_in.{param}", "{side}.conv_in.{param}"),
    ("{side}.conv_out.{param}", "{side}.conv_out.{param}"),
    ("{side}.norm_out.{param}", "{side}.conv_norm_out.{param}"),
    ("encoder.down.{level}.block.{index}.{layer}.{param}",
     "encoder.down_blocks.{level}.resnets.{index}.{layer}.{param}"),
    ("encoder.down.{level}.downsample.conv.{param}", "encoder.down_blocks.{level}.downsamplers.0.conv.{param}"),
    ("decoder.up.{up}.block.{index}.{layer}.{param}", "decoder.up_blocks.{up}.resnets.{index}.{layer}.{param}"),
    ("decoder.up.{up}.upsample.conv.{param}", "decoder.up_blocks.{up}.upsamplers.0.conv.{param}"),
    ("{side}.mid.block_{mid}.{layer}.{param}", "{side}.mid_block.resnets.{mid}.{layer}.{param}"),
    ("{side}.mid.attn_1.{attn}.{param}", "{side}.mid_block.attentions.0.{attn}.{param}"),
    ("{quant}.{param}", "{quant}.{param}"),
]


@dataclass(frozen=True)
class _Field:
    bfl: str  # regex of the value in BFL naming
    diffusers: str  # regex of the value in diffusers naming
    to_diffusers: Callable[[str, int], str] = lambda value, num_up: value  # num_up: decoder levels
    to_bfl: Callable[[str, int], str] = lambda value, num_up: value


def _renamed(mapping: dict[str, str]) -> _Field:
    inverse = {v: k for k, v in mapping.items()}
    return _Field("|".join(mapping), "|".join(re.escape(v) for v in inverse),
                  lambda value, _: mapping.get(value, value), lambda value, _: inverse.get(value, value))


_FIELDS = {
    "side": _Field("encoder|decoder", "encoder|decoder"),
    "param": _Field(r"\w+", r"\w+"),
    "level": _Field(r"\d+", r"\d+"),
    "index": _Field(r"\d+", r"\d+"),
    # BFL numbers decoder levels from the lowest resolution up, diffusers from the top down.
    "up": _Field(r"\d+", r"\d+", lambda v, n: str(n - 1 - int(v)), lambda v, n: str(n - 1 - int(v))),
    "mid": _Field("1|2", "0|1", lambda v, _: str(int(v) - 1), lambda v, _: str(int(v) + 1)),
    "layer": _renamed({"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                       "nin_shortcut": "conv_shortcut"}),
    "attn": _renamed({"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}),
    "quant": _Field("quant_conv|post_quant_conv", "quant_conv|post_quant_conv"),
}


def sniff_vae_format(sd: dict[str, torch.Tensor]) -> VAEFormat:
    """"bfl" or "diffusers" naming of a Flux VAE state dict, or ``CheckpointError``."""
    bfl = [key for key in sd if _BFL_MARKER.match(key)]
    diffusers = [key for key in sd if _DIFFUSERS_MARKER.match(key)]
    if bfl and diffusers:
        raise CheckpointError(f"the VAE mixes BFL keys ({', '.join(bfl[:2])}) and diffusers keys "
                              f"({', '.join(diffusers[:2])})")
    if bfl or diffusers:
        return "bfl" if bfl else "diffusers"
    raise CheckpointError(f"this is not a VAE checkpoint (no encoder/decoder blocks; e.g. keys {list(sd)[:3]})")


def vae_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any supported VAE naming (optionally with a wrapper prefix) -> diffusers ``AutoencoderKL`` naming."""
    sd = _strip_vae_prefix(sd)
    if sniff_vae_format(sd) == "bfl":
        return vae_bfl_to_diffusers(sd)
    vae_diffusers_to_bfl(sd)  # validates that every key is a known VAE key
    return dict(sd)


def vae_bfl_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return _convert(sd, "bfl", num_up=_count(sd, r"^decoder\.up\.(\d+)\."))


def vae_diffusers_to_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return _convert(sd, "diffusers", num_up=_count(sd, r"^decoder\.up_blocks\.(\d+)\."))


def _template_regex(template: str, naming: VAEFormat) -> re.Pattern[str]:
    pattern = re.escape(template).replace(r"\{", "{").replace(r"\}", "}")
    for name, field in _FIELDS.items():
        pattern = pattern.replace("{" + name + "}", f"(?P<{name}>{getattr(field, naming)})")
    return re.compile(f"^{pattern}$")


def _convert(sd: dict[str, torch.Tensor], source: VAEFormat, num_up: int) -> dict[str, torch.Tensor]:
    to_linear = source == "bfl"  # the BFL attention projections are 1x1 convs, diffusers' are Linear
    rules = [(_template_regex(bfl if to_linear else diffusers, source), diffusers if to_linear else bfl)
             for bfl, diffusers in _KEY_TEMPLATES]
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, tensor in sd.items():
        match, target = next(((m, target) for regex, target in rules if (m := regex.match(key))), (None, None))
        if match is None:
            unknown.append(key)
            continue
        convert = "to_diffusers" if to_linear else "to_bfl"
        new_key = target.format(**{name: getattr(_FIELDS[name], convert)(value, num_up)
                                   for name, value in match.groupdict().items()})
        if _BFL_ATTN_PROJECTION.match(key if to_linear else new_key):
            tensor = _attention_weight(tensor, key, to_linear)
        out[new_key] = tensor
    if unknown:
        naming = "BFL" if to_linear else "diffusers"
        raise CheckpointError(f"unexpected keys in a {naming}-named Flux VAE: {', '.join(sorted(unknown)[:5])}")
    return out


def _attention_weight(tensor: torch.Tensor, key: str, to_linear: bool) -> torch.Tensor:
    """1x1 conv [C,C,1,1] <-> Linear [C,C] for the mid-block attention projections (same numbers)."""
    if to_linear:
        if tensor.dim() == 4 and tensor.shape[2:] == (1, 1):
            return tensor[:, :, 0, 0]
        if tensor.dim() == 2:  # some exports already store them as Linear weights
            return tensor
    elif tensor.dim() == 2:
        return tensor[:, :, None, None]
    raise CheckpointError(f"attention weight {key} has shape {list(tensor.shape)}; expected [C,C,1,1] or [C,C]")


def _count(sd: dict[str, torch.Tensor], pattern: str) -> int:
    regex = re.compile(pattern)
    return 1 + max((int(match.group(1)) for key in sd if (match := regex.match(key))), default=-1)


def _strip_vae_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in VAE_PREFIXES:
        if sd and all(key.startswith(prefix) for key in sd):
            return {key[len(prefix):]: value for key, value in sd.items()}
    return sd
