"""GGUF DiT weights: city96 / ComfyUI-GGUF files of FLUX.1 Kontext, kept quantised while the DiT runs.

A FLUX GGUF holds the BFL-named tensors (``double_blocks.0.img_attn.qkv.weight``; sometimes with ComfyUI's
``model.diffusion_model.`` prefix): Linear weights in GGML block quantisation (Q8_0, Q5_K, Q4_0, ...; each row is
quantised on its own, in blocks of 32 or 256 values), biases and norms as F32/F16/BF16. Quantised tensors are held
as diffusers' ``GGUFParameter`` (raw block bytes [rows, bytes per row] + the quantisation type) and run in diffusers'
``GGUFLinear``, which dequantises the weight just before its matmul.

Because rows are quantised independently, every BFL -> diffusers layout change (splitting q;k;v, swapping the final
adaLN halves) is a selection of whole rows: ``bfl_to_diffusers_quantized`` runs the one key map of
``e2p_core.checkpoints`` on row-index stand-ins and then picks the same rows of the raw bytes, so nothing is
dequantised. Task LoRAs are merged per Linear: dequantise, add ``scale * up @ down``, quantise again to the same
type (or Q8_0 when gguf-py cannot write that type), one layer at a time so host memory stays near the file size.
Any other DiT file is quantised to Q8_0 on load, also one layer at a time (``quantize_dit_file``): host memory
holds the quantised model, never the float one.

Needs ``pip install gguf`` (diffusers' GGUF support reads and dequantises with it).
"""

import logging
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from diffusers.quantizers.gguf.utils import (
    SUPPORTED_GGUF_QUANT_TYPES,
    GGUFLinear,
    GGUFParameter,
    dequantize_gguf_tensor,
)

from ..checkpoints import (
    bfl_to_diffusers,
    check_lora_fits,
    infer_dit_architecture,
    load_config_json,
    load_lora_file,
    merge_lora_in_place,
    sniff_dit_format,
)
from ..checkpoints.lora import MERGE_ROWS_PER_SLICE, lora_update
from ..checkpoints.sniff import strip_prefixes
from ..checkpoints.streaming import StreamedDiT
from ..errors import CheckpointError
from ..weights import DiTWeights, check_lora_family, recorded_time_embedding

logger = logging.getLogger(__name__)

PLAIN_TYPES = {  # GGUF tensor types that are ordinary torch dtypes: read as plain tensors
    gguf.GGMLQuantizationType.F32: torch.float32,
    gguf.GGMLQuantizationType.F16: torch.float16,
    gguf.GGMLQuantizationType.BF16: torch.bfloat16,
}
# Types gguf-py can quantise to (its numpy reference quantisers); K-quants are read-only there.
WRITABLE_TYPES = (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q5_1, gguf.GGMLQuantizationType.Q5_0,
                  gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q4_0)
DEFAULT_QUANT_TYPE = gguf.GGMLQuantizationType.Q8_0  # ~1.06 bytes per weight; error ~0.4% of a row's max
Q8_0_ROWS_PER_SLICE = 1024


def is_quantized(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, GGUFParameter)


def logical_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    """The weight's [out, in] shape; a quantised tensor's own shape is [out, bytes per row]."""
    return tuple(tensor.quant_shape) if is_quantized(tensor) else tuple(tensor.shape)


def read_gguf(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a GGUF file: quantised ones as ``GGUFParameter``, F32/F16/BF16 ones as plain tensors.

    Each tensor is read into new memory with a plain file read, not copied out of the reader's memory map: copying
    from the map would keep every page of the file resident beside the copies until the map closes.
    """
    try:
        reader = gguf.GGUFReader(path)
        with open(path, "rb") as handle:
            entries = [(tensor.name, tensor.tensor_type, _read_bytes(handle, tensor, path))
                       for tensor in reader.tensors]
    except CheckpointError:
        raise
    except Exception as exc:  # gguf-py's parser fails on a damaged file with whatever error it meets first
        raise CheckpointError(f"{path} is not a readable GGUF file (truncated or damaged?): "
                              f"{type(exc).__name__}: {str(exc)[:200]}") from exc
    tensors: dict[str, torch.Tensor] = {}
    for name, kind, data in entries:
        if kind in PLAIN_TYPES:
            tensors[name] = data.view(PLAIN_TYPES[kind]) if data.dtype != PLAIN_TYPES[kind] else data
        elif kind in SUPPORTED_GGUF_QUANT_TYPES:
            tensors[name] = GGUFParameter(data.view(torch.uint8), quant_type=kind)
        else:
            supported = ", ".join(t.name for t in SUPPORTED_GGUF_QUANT_TYPES)
            raise CheckpointError(f"{path}: tensor {name} has GGUF type {kind.name}, which cannot be "
                                  f"dequantised here; supported: {supported}")
    return tensors


def _read_bytes(handle, tensor: "gguf.ReaderTensor", path: str | Path) -> torch.Tensor:
    """The bytes of ``tensor`` as a new tensor of the numpy dtype and shape the reader gives it."""
    mapped = tensor.data  # a view of the reader's map: only its dtype and shape are used, no page is touched
    data = torch.empty(mapped.shape, dtype=torch.from_numpy(np.empty(0, mapped.dtype)).dtype)
    handle.seek(tensor.data_offset)
    if handle.readinto(data.view(-1).view(torch.uint8).numpy()) != tensor.n_bytes or tensor.n_bytes != mapped.nbytes:
        raise CheckpointError(f"{path} is truncated: tensor {tensor.name} is cut short")
    return data


def load_gguf_dit(path: str | Path, config: str | Path | dict[str, Any] | None = None,
                  loras: list[tuple[str | Path, float]] = ()) -> DiTWeights:
    """A BFL-named FLUX GGUF -> :class:`DiTWeights` whose Linear weights stay quantised, LoRAs merged; the
    timestep-embedding variant is the one the LoRAs record, as for ``e2p_core.weights.load_dit``.

    ``config`` is a diffusers-style ``config.json`` (path or dict) for non-standard sizes, as for
    ``e2p_core.weights.load_dit``.
    """
    config = load_config_json(config) if isinstance(config, (str, Path)) else config
    state_dict = strip_prefixes(read_gguf(path))
    shapes = {key: torch.empty(logical_shape(value), device="meta") for key, value in state_dict.items()}
    source_format = sniff_dit_format(shapes)
    if source_format != "bfl":
        raise CheckpointError(f"{path} is a GGUF in {source_format} naming; GGUF DiTs are read in BFL naming "
                              f"(as city96 / ComfyUI-GGUF write them)")
    architecture = infer_dit_architecture(shapes, config)
    for lora_path, strength in loras:
        merge_lora_requantized(state_dict, load_lora_file(lora_path, architecture.mlp_ratio), strength,
                               Path(lora_path).name)
    return DiTWeights(state_dict, architecture, "bfl", recorded_time_embedding(loras))


def quantize_dit_file(path: str | Path, config: str | Path | dict[str, Any] | None = None,
                      loras: list[tuple[str | Path, float]] = (), device: torch.device | str = "cpu",
                      quant_type: gguf.GGMLQuantizationType = DEFAULT_QUANT_TYPE) -> DiTWeights:
    """A safetensors DiT (any naming, fp8 included) -> :class:`DiTWeights` quantised as :func:`quantize_state_dict`
    does on ``device``, LoRAs merged: the same numbers as ``load_dit`` then ``quantize_state_dict``.

    One layer at a time: each float weight is read from the file (``checkpoints.streaming``), merged, quantised and
    dropped before the next, so host memory holds the quantised model and one layer, never the float model, and no
    mapping of the file outlives the call.
    """
    config = load_config_json(config) if isinstance(config, (str, Path)) else config
    dit_file = StreamedDiT(path)
    architecture = infer_dit_architecture(dit_file.shapes, config)
    merges = []
    for lora_path, strength in loras:
        check_lora_family(lora_path, "e2p")
        lora = load_lora_file(lora_path, architecture.mlp_ratio)
        check_lora_fits(lora, dit_file.shapes, Path(lora_path).name)
        merges.append((lora, strength))
    block_size = gguf.GGML_QUANT_SIZES[quant_type][0]
    state_dict: dict[str, torch.Tensor] = {}
    for key in dit_file.shapes:
        layer = {key: dit_file.read(key)}
        module = key.removesuffix(".weight")
        for lora, strength in merges:
            if module in lora:
                merge_lora_in_place(layer, {module: lora[module]}, strength)
        state_dict[key] = _quantized_or_copied(key, layer.pop(key), device, quant_type, block_size)
    return DiTWeights(state_dict, architecture, dit_file.source_format,
                      recorded_time_embedding(loras, dit_file.metadata))


def merge_lora_requantized(state_dict_bfl: dict[str, torch.Tensor], lora: dict, strength: float = 1.0,
                           source: str = "the LoRA") -> None:
    """``checkpoints.merge_lora_in_place`` for a state dict with quantised weights, one Linear at a time, each in
    slices of rows: dequantise, add the update, quantise again to the same type (rows are quantised independently,
    so slicing changes no byte). Each merged weight replaces its entry, freeing the old one before the next."""
    check_lora_fits(lora, {key: logical_shape(value) for key, value in state_dict_bfl.items()}, source)
    for module, pair in lora.items():
        key = f"{module}.weight"
        weight = state_dict_bfl[key]
        if not is_quantized(weight):
            dense = {key: weight.float()}
            merge_lora_in_place(dense, {module: pair}, strength, source)
            state_dict_bfl[key] = dense.pop(key).to(weight.dtype)
            continue
        update = lora_update(pair, strength)
        merged = [quantize(dequantize_gguf_tensor(GGUFParameter(raw_rows, quant_type=weight.quant_type)).float()
                           + update_rows, weight.quant_type).as_tensor()
                  for raw_rows, update_rows in zip(weight.as_tensor().split(MERGE_ROWS_PER_SLICE),
                                                   update.split(MERGE_ROWS_PER_SLICE))]
        state_dict_bfl[key] = GGUFParameter(torch.cat(merged), quant_type=writable_quant_type(weight.quant_type))


def quantize(weight: torch.Tensor, quant_type: gguf.GGMLQuantizationType = DEFAULT_QUANT_TYPE) -> GGUFParameter:
    """[out, in] float weight -> GGUF blocks of ``quant_type`` (Q8_0 when gguf-py cannot write that type), on the
    weight's device. Q8_0 is computed in torch (fast, on GPU too), the others with gguf-py's numpy quantisers."""
    quant_type = writable_quant_type(quant_type)
    if quant_type == gguf.GGMLQuantizationType.Q8_0:
        return GGUFParameter(_quantize_q8_0(weight.detach()), quant_type=quant_type)
    blocks = gguf.quants.quantize(weight.detach().float().cpu().numpy(), quant_type)
    return GGUFParameter(torch.from_numpy(blocks).to(weight.device), quant_type=quant_type)


def writable_quant_type(quant_type: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """The type :func:`quantize` writes for ``quant_type``: itself, or Q8_0 when gguf-py cannot write it."""
    return quant_type if quant_type in WRITABLE_TYPES else DEFAULT_QUANT_TYPE


def quantize_state_dict(state_dict_bfl: dict[str, torch.Tensor], device: torch.device | str = "cpu",
                        quant_type: gguf.GGMLQuantizationType = DEFAULT_QUANT_TYPE) -> dict[str, torch.Tensor]:
    """Quantise every Linear weight whose rows split into whole blocks, on ``device`` (where the result stays);
    biases and norms stay as they are."""
    block_size = gguf.GGML_QUANT_SIZES[quant_type][0]
    return {key: _quantized_or_copied(key, value, device, quant_type, block_size)
            for key, value in state_dict_bfl.items()}


def dequantize_state_dict(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every quantised tensor dequantised to ``dtype`` (the other modes run a GGUF file's weights this way)."""
    return {key: dequantize_gguf_tensor(value).to(dtype) if is_quantized(value) else value
            for key, value in state_dict.items()}


def bfl_to_diffusers_quantized(state_dict_bfl: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``checkpoints.bfl_to_diffusers`` for a state dict with quantised weights; they stay quantised.

    Each quantised [R, C] weight is replaced by a stand-in whose row r holds a global row number (an expanded int32
    view, no memory); after the key map, every stand-in piece names the source rows to take from the raw bytes.
    """
    stand_ins: dict[str, torch.Tensor] = {}
    sources: list[tuple[int, GGUFParameter]] = []  # (first global row, quantised tensor)
    for key, value in state_dict_bfl.items():
        if is_quantized(value):
            start = sources[-1][0] + sources[-1][1].shape[0] if sources else 0
            rows, cols = value.quant_shape
            stand_ins[key] = torch.arange(start, start + rows, dtype=torch.int32)[:, None].expand(rows, cols)
            sources.append((start, value))
        else:
            stand_ins[key] = value
    starts = torch.tensor([start for start, _ in sources], dtype=torch.int64)
    out: dict[str, torch.Tensor] = {}
    for key, value in bfl_to_diffusers(stand_ins).items():
        if value.dtype != torch.int32:
            out[key] = value
            continue
        global_rows = value[:, 0].long()
        start, source = sources[int(torch.searchsorted(starts, global_rows[0], right=True)) - 1]
        rows = global_rows - start
        raw = source.as_tensor()
        if torch.equal(rows, torch.arange(int(rows[0]), int(rows[0]) + len(rows))):
            picked = raw[int(rows[0]) : int(rows[0]) + len(rows)]  # a view: q, k, v of a fused projection
        else:
            picked = raw[rows]  # a reordering (the final adaLN halves): a copy of those rows
        out[key] = GGUFParameter(picked, quant_type=source.quant_type)
    return out


def adopt_quantized_weights(model: torch.nn.Module, quantized: dict[str, GGUFParameter], compute_dtype: torch.dtype,
                            device: torch.device | str) -> None:
    """Swap each Linear whose weight is in ``quantized`` for a ``GGUFLinear`` holding that weight on ``device``.

    The model is on the meta device; the biases are loaded afterwards with the other plain tensors.
    """
    for key, weight in quantized.items():
        module_name = key.removesuffix(".weight")
        parent_name, _, child_name = module_name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child_name)
        if not isinstance(linear, torch.nn.Linear) or not key.endswith(".weight"):
            raise CheckpointError(f"quantised tensor {key} is not the weight of a Linear layer")
        if logical_shape(weight) != tuple(linear.weight.shape):
            raise CheckpointError(f"quantised weight {key} is {list(logical_shape(weight))}, the model expects "
                                  f"{list(linear.weight.shape)}")
        with torch.device("meta"):
            replacement = GGUFLinear(linear.in_features, linear.out_features, linear.bias is not None,
                                     compute_dtype=compute_dtype)
        replacement.weight = GGUFParameter(weight.as_tensor().to(device), quant_type=weight.quant_type)
        setattr(parent, child_name, replacement.requires_grad_(False))


def _quantize_q8_0(weight: torch.Tensor) -> torch.Tensor:
    """GGML Q8_0 as gguf-py computes it: per 32 values an fp16 scale d = max|x|/127 and int8 round(x/d), rounding
    halves away from zero. [out, in] -> uint8 [out, in/32 * 34], in slices of rows to bound the float32 temporaries."""
    return torch.cat([_quantize_q8_0_rows(rows) for rows in weight.split(Q8_0_ROWS_PER_SLICE)])


def _quantize_q8_0_rows(weight: torch.Tensor) -> torch.Tensor:
    blocks = weight.float().reshape(weight.shape[0], -1, 32)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    inverse = torch.where(scale == 0, 0.0, 1 / scale)
    scaled = blocks * inverse
    magnitude = scaled.abs()
    whole = magnitude.floor()
    rounded = scaled.sign() * (whole + (2 * (magnitude - whole)).floor())  # gguf-py's np_roundf
    packed = torch.cat([scale.to(torch.float16).view(torch.uint8), rounded.to(torch.int8).view(torch.uint8)], dim=-1)
    return packed.reshape(weight.shape[0], -1)


def _quantized_or_copied(key: str, value: torch.Tensor, device: torch.device | str,
                         quant_type: gguf.GGMLQuantizationType, block_size: int) -> torch.Tensor:
    """A Linear weight quantised on ``device``; anything else (biases, norms) copied, so that nothing of the
    quantised model keeps the source file's memory mapping alive."""
    if _is_linear_weight(key, value, block_size):
        return quantize(value.to(device), quant_type)
    return value.clone()


def _is_linear_weight(key: str, value: torch.Tensor, block_size: int) -> bool:
    return key.endswith(".weight") and value.ndim == 2 and value.shape[1] % block_size == 0
