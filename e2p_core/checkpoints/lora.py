"""Flux DiT LoRAs: reading the four key styles into BFL-named pairs, merging them, and writing them back out.

A ``LoraPair`` is one low-rank update ``delta W = scale * up @ down`` of one BFL Linear. Styles (E2P-SPEC §3.3):

* ``kohya``: ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``
  (what E2P releases); scale = alpha / rank.
* ``bfl_peft`` (ComfyUI): ``double_blocks.0.img_attn.qkv.lora_A.weight`` (or ``lora_down``/``lora_up``).
* ``diffsynth_peft``: ``blocks.0.attn.a_to_qkv.lora_A.default.weight`` (``.default`` optional).
* ``diffusers_peft``: ``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``; fused BFL projections are
  split into to_q/to_k/to_v(/proj_mlp), each with its own pair.

PEFT-style scales come from the ``lora_adapter_metadata`` JSON diffusers writes into the safetensors header,
else from ``.alpha`` keys, else 1 (PEFT's alpha = rank default).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CheckpointError
from .arch import DiTArchitecture
from .dit_keys import ModuleNames, block_counts, fused_piece_rows, module_table, swap_halves
from .io import load_state_dict, read_metadata
from .sniff import DiTFormat, LoraFormat, sniff_lora_format, strip_prefixes

LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors header entry holding the LoraConfig JSON
DIFFUSERS_LORA_PREFIX = "transformer."  # how diffusers pipelines save transformer LoRAs

_KOHYA_KEY = re.compile(r"^(?P<module>lora_unet_\w+?)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$")
_PEFT_KEY = re.compile(r"^(?P<module>.+?)\.(?P<part>lora_(?:A|B|down|up)(?:\.(?P<adapter>[^.]+))?\.weight|alpha)$")
_KOHYA_BLOCK = re.compile(r"^lora_unet_(double|single)_blocks_(\d+)_")
# Rows of a weight updated per step of an in-place merge: bounds the float32 copy of the weight to rows x in.
MERGE_ROWS_PER_SLICE = 1024
_PEFT_STYLE_NAMING: dict[str, DiTFormat] = {"bfl_peft": "bfl", "diffsynth_peft": "diffsynth",
                                            "diffusers_peft": "diffusers"}


@dataclass
class LoraPair:
    down: torch.Tensor  # [rank, in]
    up: torch.Tensor  # [out, rank]
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> torch.Tensor:
        """The float32 weight update ``scale * up @ down`` [out, in] (scaled in place: one [out, in] temporary)."""
        return (self.up.to(torch.float32) @ self.down.to(torch.float32)).mul_(self.scale)


def load_lora_file(path: str | os.PathLike, mlp_ratio: float = 4.0) -> dict[str, LoraPair]:
    """Read a LoRA file (any supported style) with its safetensors metadata; see ``load_lora``."""
    path = os.fspath(path)
    metadata = read_metadata(path) if path.endswith((".safetensors", ".sft")) else None
    return load_lora(load_state_dict(path), metadata, mlp_ratio)


def load_lora(sd: dict[str, torch.Tensor], metadata: dict[str, str] | None = None, mlp_ratio: float = 4.0
              ) -> dict[str, LoraPair]:
    """LoRA pairs keyed by BFL module name (``double_blocks.0.img_attn.qkv``, ``single_blocks.0.linear1``, …).

    ``metadata`` is the safetensors header (for diffusers' alpha). ``mlp_ratio`` sizes the zero rows of a
    single-block ``proj_mlp`` that a diffusers LoRA did not train (FLUX uses 4).
    """
    sd = strip_prefixes(sd)
    style = sniff_lora_format(sd)
    raw = _group_keys(sd, style)
    config = _peft_config(metadata) if style != "kohya" else None
    pairs = {module: _make_pair(module, parts, config) for module, parts in raw.items()}
    if style == "kohya":
        return _kohya_to_bfl(pairs)
    return _peft_to_bfl(pairs, _PEFT_STYLE_NAMING[style], mlp_ratio)


def check_lora_fits(lora: dict[str, LoraPair], weight_shapes: Mapping[str, Sequence[int]],
                    source: str = "the LoRA") -> None:
    """Raise unless every module of ``lora`` is in the base model with the shape of ``up @ down``.

    ``weight_shapes``: BFL weight key -> shape of the base model (a state dict's tensors, or their shapes).
    ``source`` names the LoRA in the message (its file name).
    """
    for module, pair in lora.items():
        expected = [pair.up.shape[0], pair.down.shape[1]]
        found = weight_shapes.get(f"{module}.weight")
        found = None if found is None else list(getattr(found, "shape", found))
        if found != expected:
            raise CheckpointError(f"{source} is a LoRA for another base model: module {module} expects {expected}, "
                                  f"the base model has {found or 'no such module'}")


def merge_lora(sd_bfl: dict[str, torch.Tensor], lora: dict[str, LoraPair], strength: float = 1.0,
               source: str = "the LoRA") -> dict[str, torch.Tensor]:
    """Return a copy of ``sd_bfl`` with ``W += strength * scale * up @ down`` (float32 math, W's dtype kept).

    The weights the LoRA touches are copied; use :func:`merge_lora_in_place` on a state dict nobody else holds.
    """
    check_lora_fits(lora, sd_bfl, source)
    out = dict(sd_bfl)
    for module in lora:
        out[f"{module}.weight"] = sd_bfl[f"{module}.weight"].clone()
    merge_lora_in_place(out, lora, strength, source)
    return out


def merge_lora_in_place(sd_bfl: dict[str, torch.Tensor], lora: dict[str, LoraPair], strength: float = 1.0,
                        source: str = "the LoRA") -> None:
    """``W += strength * scale * up @ down`` written into the weight tensors of ``sd_bfl`` themselves.

    The same numbers as :func:`merge_lora` (float32 math, W's dtype kept). The update is computed per layer (one
    float32 layer at a time) and added in slices of ``MERGE_ROWS_PER_SLICE`` rows, so a whole model is merged
    without a second copy of it. Only for a state dict the caller owns, whose weights share no memory with each
    other: a safetensors file read with ``load_state_dict`` is a private (copy-on-write) mapping, so the file on disk
    is never changed.
    """
    check_lora_fits(lora, sd_bfl, source)
    for module, pair in lora.items():
        weight = sd_bfl[f"{module}.weight"]
        update = lora_update(pair, strength)
        for rows, update_rows in zip(weight.split(MERGE_ROWS_PER_SLICE), update.split(MERGE_ROWS_PER_SLICE)):
            rows.copy_((rows.to(torch.float32) + update_rows).to(rows.dtype))


def lora_update(pair: LoraPair, strength: float = 1.0) -> torch.Tensor:
    """``strength * scale * up @ down`` in float32 [out, in], the product computed whole: its sums must not depend on
    how a merge slices the weight (a product of fewer rows may take another kernel, and round differently)."""
    return pair.delta().mul_(strength)


def lora_to_kohya(lora: dict[str, LoraPair]) -> dict[str, torch.Tensor]:
    """kohya style as E2P writes it: ``.alpha`` = rank (0-d int64), the scale folded into ``lora_up``."""
    out: dict[str, torch.Tensor] = {}
    for module, pair in lora.items():
        base = "lora_unet_" + module.replace(".", "_")
        out[f"{base}.lora_down.weight"] = pair.down
        out[f"{base}.lora_up.weight"] = _scaled_up(pair)
        out[f"{base}.alpha"] = torch.tensor(pair.rank, dtype=torch.int64)
    return out


def lora_to_diffsynth_peft(lora: dict[str, LoraPair]) -> dict[str, torch.Tensor]:
    """DiffSynth-PEFT style (``.lora_A.default.weight``); it has no alpha, so the scale is folded into B."""
    modules = _bfl_modules(list(lora))
    out: dict[str, torch.Tensor] = {}
    for name, pair in lora.items():
        module = modules[name]
        up = _scaled_up(pair)
        if module.kind == "final_mod":
            up = swap_halves(up, name)
        out[f"{module.diffsynth}.lora_A.default.weight"] = pair.down
        out[f"{module.diffsynth}.lora_B.default.weight"] = up
    return out


def lora_to_diffusers_peft(lora: dict[str, LoraPair], arch: DiTArchitecture | None = None
                           ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """diffusers-PEFT style with the ``transformer.`` prefix, plus the safetensors metadata holding the LoraConfig.

    Fused projections are split by rows of ``up``; the pieces share ``down``. ``arch`` checks the hidden size.
    """
    modules = _bfl_modules(list(lora))
    sd: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for name, pair in lora.items():
        module = modules[name]
        hidden = pair.down.shape[1]
        if arch is not None and len(module.diffusers) > 1 and hidden != arch.hidden_size:
            raise CheckpointError(f"LoRA for another base model: {name} takes {hidden} inputs, the DiT's hidden size "
                                  f"is {arch.hidden_size}")
        up = swap_halves(pair.up, name) if module.kind == "final_mod" else pair.up
        sizes = fused_piece_rows(len(module.diffusers), up.shape[0], hidden, name) if len(module.diffusers) > 1 \
            else [up.shape[0]]
        for piece, piece_up in zip(module.diffusers, torch.split(up, sizes)):
            sd[f"{DIFFUSERS_LORA_PREFIX}{piece}.lora_A.weight"] = pair.down.clone()
            sd[f"{DIFFUSERS_LORA_PREFIX}{piece}.lora_B.weight"] = piece_up.clone()
            ranks[piece] = pair.rank
            alphas[piece] = pair.scale * pair.rank
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = {
        "r": rank,
        "lora_alpha": alpha,
        "rank_pattern": {m: r for m, r in ranks.items() if r != rank},
        "alpha_pattern": {m: a for m, a in alphas.items() if a != alpha},
        "target_modules": sorted(ranks),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
    }
    packed = {DIFFUSERS_LORA_PREFIX + key: value for key, value in config.items()}
    return sd, {"format": "pt", LORA_METADATA_KEY: json.dumps(packed, sort_keys=True)}


def _group_keys(sd: dict[str, torch.Tensor], style: LoraFormat) -> dict[str, dict[str, torch.Tensor]]:
    """{module: {"down", "up", optional "alpha"}} in the file's own module naming."""
    pattern = _KOHYA_KEY if style == "kohya" else _PEFT_KEY
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    adapters: set[str] = set()
    for key, tensor in sd.items():
        match = pattern.match(key)
        if match is None:
            unknown.append(key)
            continue
        part = match["part"]
        if match.groupdict().get("adapter"):
            adapters.add(match["adapter"])
        role = "alpha" if part == "alpha" else ("down" if part.startswith(("lora_down", "lora_A")) else "up")
        grouped.setdefault(match["module"], {})[role] = tensor
    if unknown:
        raise CheckpointError(f"unsupported keys in a {style} LoRA (text-encoder parts, DoRA or LoRA biases are "
                              f"not supported): {', '.join(sorted(unknown)[:5])}")
    if len(adapters) > 1:
        raise CheckpointError(f"the LoRA holds several adapters {sorted(adapters)}; save one adapter per file")
    incomplete = [module for module, parts in grouped.items() if "down" not in parts or "up" not in parts]
    if incomplete:
        raise CheckpointError(f"LoRA modules without both down/A and up/B weights: {incomplete[:5]}")
    return grouped


def _peft_config(metadata: dict[str, str] | None) -> dict[str, Any] | None:
    """The LoraConfig dict from diffusers' header entry; pipeline-level files prefix its keys with ``transformer.``."""
    if not metadata or LORA_METADATA_KEY not in metadata:
        return None
    try:
        config = json.loads(metadata[LORA_METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"the LoRA's {LORA_METADATA_KEY} header is not valid JSON: {exc}") from exc
    if any(key.startswith(DIFFUSERS_LORA_PREFIX) for key in config):
        prefix = DIFFUSERS_LORA_PREFIX
        config = {key.removeprefix(prefix): value for key, value in config.items() if key.startswith(prefix)}
    return config


def _make_pair(module: str, parts: dict[str, torch.Tensor], config: dict[str, Any] | None) -> LoraPair:
    down, up = parts["down"], parts["up"]
    if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
        raise CheckpointError(f"LoRA module {module}: down {list(down.shape)} and up {list(up.shape)} are not a "
                              f"rank-r pair [r,in] / [out,r]")
    rank = down.shape[0]
    if config is not None:
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", rank)))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    elif "alpha" in parts:
        scale = float(parts["alpha"].item()) / rank
    else:
        scale = 1.0
    return LoraPair(down, up, scale)


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank/alpha pattern lookup: a pattern matches a module name ending in it."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _kohya_to_bfl(pairs: dict[str, LoraPair]) -> dict[str, LoraPair]:
    counts: dict[str, int] = {"double": 0, "single": 0}
    for name in pairs:
        if match := _KOHYA_BLOCK.match(name):
            counts[match[1]] = max(counts[match[1]], int(match[2]) + 1)
    kohya_names = {"lora_unet_" + m.bfl.replace(".", "_"): m.bfl
                   for m in module_table(counts["double"], counts["single"]) if m.kind != "norm"}
    unknown = [name for name in pairs if name not in kohya_names]
    if unknown:
        raise CheckpointError(f"LoRA modules that are not Linear layers of a Flux DiT: {unknown[:5]}")
    return {kohya_names[name]: pair for name, pair in pairs.items()}


def _peft_to_bfl(pairs: dict[str, LoraPair], naming: DiTFormat, mlp_ratio: float) -> dict[str, LoraPair]:
    table = [m for m in module_table(*block_counts(list(pairs), naming)) if m.kind != "norm"]
    where = {name: (m, i) for m in table for i, name in enumerate(m.names(naming))}
    unknown = [name for name in pairs if name not in where]
    if unknown:
        raise CheckpointError(f"LoRA modules that are not Linear layers of a Flux DiT ({naming} naming): {unknown[:5]}")
    pieces: dict[str, tuple[ModuleNames, dict[int, LoraPair]]] = {}
    for name, pair in pairs.items():
        module, index = where[name]
        pieces.setdefault(module.bfl, (module, {}))[1][index] = pair
    out: dict[str, LoraPair] = {}
    for bfl_name, (module, parts) in pieces.items():
        if len(module.names(naming)) > 1:
            out[bfl_name] = _fuse(module, parts, mlp_ratio)
        elif module.kind == "final_mod":
            out[bfl_name] = LoraPair(parts[0].down, swap_halves(parts[0].up, bfl_name), parts[0].scale)
        else:
            out[bfl_name] = parts[0]
    return out


def _fuse(module: ModuleNames, parts: dict[int, LoraPair], mlp_ratio: float) -> LoraPair:
    """One pair for a fused BFL projection from its diffusers pieces; untrained pieces get zero rows of ``up``."""
    hidden = {pair.down.shape[1] for pair in parts.values()}
    if len(hidden) != 1:
        raise CheckpointError(f"the LoRA pieces of {module.bfl} disagree on the input size: {sorted(hidden)}")
    (width,) = hidden
    rows = [width] * 3 + ([parts[3].up.shape[0] if 3 in parts else round(mlp_ratio * width)]
                          if len(module.diffusers) == 4 else [])
    for index, pair in parts.items():
        if pair.up.shape[0] != rows[index]:
            raise CheckpointError(f"LoRA piece {module.diffusers[index]} has {pair.up.shape[0]} outputs, expected "
                                  f"{rows[index]}")
    first = next(iter(parts.values()))
    if len(parts) == len(rows) and all(torch.equal(p.down, first.down) and p.scale == first.scale
                                       for p in parts.values()):
        # Pieces split from one fused pair (as lora_to_diffusers_peft and kohya converters do): keep the rank.
        return LoraPair(first.down, torch.cat([parts[i].up for i in range(len(rows))]), first.scale)
    same_scale = len({p.scale for p in parts.values()}) == 1
    order = sorted(parts)
    down = torch.cat([parts[i].down for i in order])
    up = torch.zeros(sum(rows), down.shape[0], dtype=first.up.dtype)
    row_start = [sum(rows[:i]) for i in range(len(rows))]
    col = 0
    for i in order:
        pair = parts[i]
        piece_up = pair.up if same_scale else _scaled_up(pair)
        up[row_start[i]:row_start[i] + rows[i], col:col + pair.rank] = piece_up
        col += pair.rank
    return LoraPair(down, up, first.scale if same_scale else 1.0)


def _bfl_modules(names: list[str]) -> dict[str, ModuleNames]:
    table = {m.bfl: m for m in module_table(*block_counts(names, "bfl")) if m.kind != "norm"}
    unknown = [name for name in names if name not in table]
    if unknown:
        raise CheckpointError(f"LoRA modules that are not Linear layers of a BFL-named Flux DiT: {unknown[:5]}")
    return {name: table[name] for name in names}


def _scaled_up(pair: LoraPair) -> torch.Tensor:
    return pair.up if pair.scale == 1.0 else (pair.up.to(torch.float32) * pair.scale).to(pair.up.dtype)
