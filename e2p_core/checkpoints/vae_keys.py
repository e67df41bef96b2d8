"""Flux VAE state-dict conversion: BFL ``ae.safetensors`` naming <-> diffusers ``AutoencoderKL`` naming.

Differences besides names: the BFL decoder numbers its levels from the lowest resolution up (``decoder.up.{i}`` is
diffusers ``decoder.up_blocks.{n-1-i}``), and the mid-block attention q/k/v/proj_out are 1x1 convs [C,C,1,1] in
BFL but Linear [C,C] in diffusers. Level and resnet counts come from the keys; every key must be mapped.
"""

from __future__ import annotations

import re
from typing import Callable, Literal

import torch

from ..errors import CheckpointError

VAEFormat = Literal["bfl", "diffusers"]
# Wrappers seen around VAE weights: SD-style single files and pipeline-style dumps.
VAE_PREFIXES = ("first_stage_model.", "vae.", "ae.")

_BFL_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_DIFFUSERS_ATTN = {v: k for k, v in _BFL_ATTN.items()}
_BFL_MARKER = re.compile(r"^(encoder|decoder)\.(down|up|mid)\.")
_BFL_ATTN_PROJECTION = re.compile(r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")
_DIFFUSERS_MARKER = re.compile(r"^(encoder|decoder)\.(down_blocks|up_blocks|mid_block)\.")

Rule = tuple[re.Pattern[str], Callable[[re.Match[str]], str]]


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
    num_up = _count(sd, r"^decoder\.up\.(\d+)\.")
    return _apply_rules(sd, _bfl_rules(num_up), "BFL", to_linear=True)


def vae_diffusers_to_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    num_up = _count(sd, r"^decoder\.up_blocks\.(\d+)\.")
    return _apply_rules(sd, _diffusers_rules(num_up), "diffusers", to_linear=False)


def _bfl_rules(num_up: int) -> list[Rule]:
    return [
        (re.compile(r"^(encoder|decoder)\.(conv_in|conv_out)\.(\w+)$"), lambda m: m.group(0)),
        (re.compile(r"^(encoder|decoder)\.norm_out\.(\w+)$"), lambda m: f"{m[1]}.conv_norm_out.{m[2]}"),
        (re.compile(r"^encoder\.down\.(\d+)\.block\.(\d+)\.(\w+)\.(\w+)$"),
         lambda m: f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{_resnet_to_diffusers(m[3])}.{m[4]}"),
        (re.compile(r"^encoder\.down\.(\d+)\.downsample\.conv\.(\w+)$"),
         lambda m: f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"),
        (re.compile(r"^decoder\.up\.(\d+)\.block\.(\d+)\.(\w+)\.(\w+)$"),
         lambda m: f"decoder.up_blocks.{num_up - 1 - int(m[1])}.resnets.{m[2]}.{_resnet_to_diffusers(m[3])}.{m[4]}"),
        (re.compile(r"^decoder\.up\.(\d+)\.upsample\.conv\.(\w+)$"),
         lambda m: f"decoder.up_blocks.{num_up - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"),
        (re.compile(r"^(encoder|decoder)\.mid\.block_([12])\.(\w+)\.(\w+)$"),
         lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{_resnet_to_diffusers(m[3])}.{m[4]}"),
        (re.compile(r"^(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(\w+)$"),
         lambda m: f"{m[1]}.mid_block.attentions.0.{_BFL_ATTN[m[2]]}.{m[3]}"),
        (re.compile(r"^(post_quant_conv|quant_conv)\.(\w+)$"), lambda m: m.group(0)),
    ]


def _diffusers_rules(num_up: int) -> list[Rule]:
    return [
        (re.compile(r"^(encoder|decoder)\.(conv_in|conv_out)\.(\w+)$"), lambda m: m.group(0)),
        (re.compile(r"^(encoder|decoder)\.conv_norm_out\.(\w+)$"), lambda m: f"{m[1]}.norm_out.{m[2]}"),
        (re.compile(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(\w+)$"),
         lambda m: f"encoder.down.{m[1]}.block.{m[2]}.{_resnet_to_bfl(m[3])}.{m[4]}"),
        (re.compile(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)$"),
         lambda m: f"encoder.down.{m[1]}.downsample.conv.{m[2]}"),
        (re.compile(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(\w+)$"),
         lambda m: f"decoder.up.{num_up - 1 - int(m[1])}.block.{m[2]}.{_resnet_to_bfl(m[3])}.{m[4]}"),
        (re.compile(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)$"),
         lambda m: f"decoder.up.{num_up - 1 - int(m[1])}.upsample.conv.{m[2]}"),
        (re.compile(r"^(encoder|decoder)\.mid_block\.resnets\.([01])\.(\w+)\.(\w+)$"),
         lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.{_resnet_to_bfl(m[3])}.{m[4]}"),
        (re.compile(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(\w+)$"),
         lambda m: f"{m[1]}.mid.attn_1.{_DIFFUSERS_ATTN[m[2]]}.{m[3]}"),
        (re.compile(r"^(post_quant_conv|quant_conv)\.(\w+)$"), lambda m: m.group(0)),
    ]


def _resnet_to_diffusers(name: str) -> str:
    return "conv_shortcut" if name == "nin_shortcut" else name


def _resnet_to_bfl(name: str) -> str:
    return "nin_shortcut" if name == "conv_shortcut" else name


def _apply_rules(sd: dict[str, torch.Tensor], rules: list[Rule], naming: str, to_linear: bool
                 ) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, tensor in sd.items():
        new_key = next((convert(match) for pattern, convert in rules if (match := pattern.match(key))), None)
        if new_key is None:
            unknown.append(key)
            continue
        if _BFL_ATTN_PROJECTION.match(key if to_linear else new_key):
            tensor = _attention_weight(tensor, key, to_linear)
        out[new_key] = tensor
    if unknown:
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
