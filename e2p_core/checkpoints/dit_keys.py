"""Flux DiT state-dict conversion between the BFL, DiffSynth and diffusers namings (E2P-SPEC §3.2).

BFL is the hub. One table (``_TOP``, ``_DOUBLE``, ``_SINGLE``) lists every module in the three namings; a converter
reads each module from the source into BFL layout and writes it out in the target layout. The layouts differ in
two ways besides names:

* fused projections: BFL/DiffSynth keep q;k;v (double blocks) and q;k;v;mlp (single ``linear1``) as one Linear,
  diffusers splits them into ``to_q``/``to_k``/``to_v`` (+ ``proj_mlp``); q, k and v each have hidden-size rows;
* the final adaLN Linear stores its row halves as [shift; scale] in BFL and [scale; shift] elsewhere.

Sizes come from the tensors (nothing assumes FLUX's 3072), results are slices or concatenations (bit-exact), and
every source key must be used: anything left over or missing is a ``CheckpointError``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import CheckpointError
from .io import has_fp8_scales
from .sniff import DiTFormat, sniff_dit_format, strip_prefixes

ModuleKind = Literal["linear", "norm", "final_mod"]
DIT_FORMATS: tuple[DiTFormat, ...] = ("bfl", "diffsynth", "diffusers")


@dataclass(frozen=True)
class ModuleNames:
    """One DiT module in the three namings; ``diffusers`` holds several names when BFL fuses the pieces."""

    bfl: str
    diffsynth: str
    diffusers: tuple[str, ...]
    kind: ModuleKind = "linear"
    optional: bool = False  # guidance embedder: absent in FLUX.1-schnell-like models

    def names(self, fmt: DiTFormat) -> tuple[str, ...]:
        return self.diffusers if fmt == "diffusers" else ((self.bfl,) if fmt == "bfl" else (self.diffsynth,))


def _m(bfl: str, diffsynth: str, diffusers: str | tuple[str, ...], kind: ModuleKind = "linear",
       optional: bool = False) -> ModuleNames:
    return ModuleNames(bfl, diffsynth, (diffusers,) if isinstance(diffusers, str) else diffusers, kind, optional)


_TOP = (
    _m("img_in", "x_embedder", "x_embedder"),
    _m("txt_in", "context_embedder", "context_embedder"),
    _m("time_in.in_layer", "time_embedder.timestep_embedder.0", "time_text_embed.timestep_embedder.linear_1"),
    _m("time_in.out_layer", "time_embedder.timestep_embedder.2", "time_text_embed.timestep_embedder.linear_2"),
    _m("guidance_in.in_layer", "guidance_embedder.timestep_embedder.0", "time_text_embed.guidance_embedder.linear_1",
       optional=True),
    _m("guidance_in.out_layer", "guidance_embedder.timestep_embedder.2", "time_text_embed.guidance_embedder.linear_2",
       optional=True),
    _m("vector_in.in_layer", "pooled_text_embedder.0", "time_text_embed.text_embedder.linear_1"),
    _m("vector_in.out_layer", "pooled_text_embedder.2", "time_text_embed.text_embedder.linear_2"),
    _m("final_layer.adaLN_modulation.1", "final_norm_out.linear", "norm_out.linear", kind="final_mod"),
    _m("final_layer.linear", "final_proj_out", "proj_out"),
)
_DOUBLE = (
    _m("img_mod.lin", "norm1_a.linear", "norm1.linear"),
    _m("txt_mod.lin", "norm1_b.linear", "norm1_context.linear"),
    _m("img_attn.qkv", "attn.a_to_qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    _m("txt_attn.qkv", "attn.b_to_qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    _m("img_attn.norm.query_norm", "attn.norm_q_a", "attn.norm_q", kind="norm"),
    _m("img_attn.norm.key_norm", "attn.norm_k_a", "attn.norm_k", kind="norm"),
    _m("txt_attn.norm.query_norm", "attn.norm_q_b", "attn.norm_added_q", kind="norm"),
    _m("txt_attn.norm.key_norm", "attn.norm_k_b", "attn.norm_added_k", kind="norm"),
    _m("img_attn.proj", "attn.a_to_out", "attn.to_out.0"),
    _m("txt_attn.proj", "attn.b_to_out", "attn.to_add_out"),
    _m("img_mlp.0", "ff_a.0", "ff.net.0.proj"),
    _m("img_mlp.2", "ff_a.2", "ff.net.2"),
    _m("txt_mlp.0", "ff_b.0", "ff_context.net.0.proj"),
    _m("txt_mlp.2", "ff_b.2", "ff_context.net.2"),
)
_SINGLE = (
    _m("modulation.lin", "norm.linear", "norm.linear"),
    _m("linear1", "to_qkv_mlp", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
    _m("norm.query_norm", "norm_q_a", "attn.norm_q", kind="norm"),
    _m("norm.key_norm", "norm_k_a", "attn.norm_k", kind="norm"),
    _m("linear2", "proj_out", "proj_out"),
)
BLOCK_PREFIXES: dict[str, dict[DiTFormat, str]] = {
    "double": {"bfl": "double_blocks.{i}.", "diffsynth": "blocks.{i}.", "diffusers": "transformer_blocks.{i}."},
    "single": {"bfl": "single_blocks.{i}.", "diffsynth": "single_blocks.{i}.",
               "diffusers": "single_transformer_blocks.{i}."},
}


def module_table(num_double: int, num_single: int) -> list[ModuleNames]:
    """Every module of a Flux DiT with the given block counts, with full names in the three namings."""
    table = list(_TOP)
    for kind, count, modules in (("double", num_double, _DOUBLE), ("single", num_single, _SINGLE)):
        for i in range(count):
            pre = {fmt: template.format(i=i) for fmt, template in BLOCK_PREFIXES[kind].items()}
            table += [ModuleNames(pre["bfl"] + m.bfl, pre["diffsynth"] + m.diffsynth,
                                  tuple(pre["diffusers"] + name for name in m.diffusers), m.kind, m.optional)
                      for m in modules]
    return table


def block_counts(names: list[str], fmt: DiTFormat) -> tuple[int, int]:
    """(double, single) block counts = 1 + the highest block index found in key or module names."""
    counts = []
    for kind in ("double", "single"):
        pattern = re.compile("^" + re.escape(BLOCK_PREFIXES[kind][fmt]).replace(r"\{i\}", r"(\d+)"))
        indices = [int(match.group(1)) for name in names if (match := pattern.match(name))]
        counts.append(max(indices, default=-1) + 1)
    return counts[0], counts[1]


def fused_piece_rows(num_pieces: int, rows: int, hidden: int, what: str) -> list[int]:
    """Row sizes of the pieces of a fused projection: q, k, v have ``hidden`` rows each, the MLP the rest."""
    sizes = [hidden] * 3 + ([rows - 3 * hidden] if num_pieces == 4 else [])
    if sum(sizes) != rows or min(sizes) <= 0:
        raise CheckpointError(f"{what} has {rows} rows, which cannot be split into {num_pieces} pieces with "
                              f"q/k/v = hidden size {hidden}")
    return sizes


def swap_halves(t: torch.Tensor, what: str) -> torch.Tensor:
    """[a; b] -> [b; a] along dim 0: BFL's final adaLN [shift; scale] <-> [scale; shift]. Its own inverse."""
    if t.shape[0] % 2:
        raise CheckpointError(f"{what} has an odd number of rows ({t.shape[0]}); expected [shift; scale] halves")
    half = t.shape[0] // 2
    return torch.cat([t[half:], t[:half]])


def to_bfl(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], DiTFormat]:
    """Convert a Flux DiT state dict in any naming (with or without a wrapper prefix) to BFL naming."""
    sd = _prepared(sd)
    source = sniff_dit_format(sd)
    return _convert(sd, source, "bfl"), source


def convert_dit(sd: dict[str, torch.Tensor], to: DiTFormat) -> dict[str, torch.Tensor]:
    """Convert a Flux DiT state dict in any naming to the naming ``to`` ("bfl", "diffsynth" or "diffusers")."""
    if to not in DIT_FORMATS:
        raise CheckpointError(f"unknown DiT naming {to!r}; expected one of {DIT_FORMATS}")
    sd = _prepared(sd)
    return _convert(sd, sniff_dit_format(sd), to)


def diffsynth_to_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return _convert(strip_prefixes(sd), "diffsynth", "bfl")


def bfl_to_diffsynth(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return _convert(strip_prefixes(sd), "bfl", "diffsynth")


def diffusers_to_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return _convert(strip_prefixes(sd), "diffusers", "bfl")


def bfl_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL -> diffusers. Split pieces are views of the fused tensors (no copy); clone them before in-place edits."""
    return _convert(strip_prefixes(sd), "bfl", "diffusers")


def _prepared(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = strip_prefixes(sd)
    if has_fp8_scales(sd):
        raise CheckpointError("this is a ComfyUI scaled-fp8 checkpoint (it has scale_weight / scaled_fp8 keys); "
                              "upcast it first with e2p_core.checkpoints.dequantize(sd, dtype)")
    return sd


def _convert(sd: dict[str, torch.Tensor], source: DiTFormat, target: DiTFormat) -> dict[str, torch.Tensor]:
    remaining = dict(sd)
    out: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    for module in module_table(*block_counts(list(sd), source)):
        params = _read_module(remaining, module, source)
        if params is None:
            if not module.optional:
                missing.append(module.names(source)[0])
            continue
        _write_module(out, module, params, target)
    if missing:
        raise CheckpointError(f"incomplete Flux DiT checkpoint ({source} naming): missing modules {_few(missing)}")
    if remaining:
        raise CheckpointError(f"unexpected keys in a Flux DiT checkpoint ({source} naming): {_few(sorted(remaining))}")
    return out


def _param_names(kind: ModuleKind, fmt: DiTFormat) -> tuple[str, ...]:
    if kind == "norm":
        return ("scale",) if fmt == "bfl" else ("weight",)
    return ("weight", "bias")


def _read_module(remaining: dict[str, torch.Tensor], module: ModuleNames, fmt: DiTFormat
                 ) -> dict[str, torch.Tensor] | None:
    """Pop one module's tensors from ``remaining`` in BFL layout (keys: BFL parameter names), None if absent."""
    names = module.names(fmt)
    params = _param_names(module.kind, fmt)
    present = [name for name in names if f"{name}.{params[0]}" in remaining]
    if not present:
        return None
    if len(present) < len(names):
        missing = [name for name in names if name not in present]
        raise CheckpointError(f"fused projection {module.bfl} is incomplete: {present} present, {missing} missing")
    pieces = {p: [remaining.pop(f"{name}.{p}") for name in names if f"{name}.{p}" in remaining] for p in params}
    read: dict[str, torch.Tensor] = {}
    for param, bfl_param in zip(params, _param_names(module.kind, "bfl")):
        if not pieces[param]:
            continue
        if len(pieces[param]) != len(names):
            raise CheckpointError(f"only some pieces of {module.bfl} have a {param}: {names}")
        read[bfl_param] = pieces[param][0] if len(names) == 1 else torch.cat(pieces[param])
    if module.kind == "final_mod" and fmt != "bfl":
        read = {p: swap_halves(t, module.bfl) for p, t in read.items()}
    return read


def _write_module(out: dict[str, torch.Tensor], module: ModuleNames, params: dict[str, torch.Tensor],
                  fmt: DiTFormat) -> None:
    names = module.names(fmt)
    if module.kind == "final_mod" and fmt != "bfl":
        params = {p: swap_halves(t, module.bfl) for p, t in params.items()}
    sizes = None
    if len(names) > 1:
        weight = params["weight"]
        sizes = fused_piece_rows(len(names), weight.shape[0], weight.shape[1], module.bfl)
    for bfl_param, param in zip(_param_names(module.kind, "bfl"), _param_names(module.kind, fmt)):
        if bfl_param not in params:
            continue
        parts = (params[bfl_param],) if sizes is None else torch.split(params[bfl_param], sizes)
        for name, part in zip(names, parts):
            out[f"{name}.{param}"] = part


def _few(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" (and {len(items) - n} more)" if len(items) > n else "")
