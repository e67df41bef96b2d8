"""A safetensors DiT read one BFL tensor at a time, with plain file reads instead of a memory mapping.

``load_state_dict`` maps the file: free to open, and the model can adopt its pages, but every page read stays
resident while any tensor of the file is alive. A loader that converts every weight (the GGUF mode quantises them)
needs each float weight only for a moment: :class:`StreamedDiT` hands them out one at a time, in BFL naming and
layout with fp8 upcast as ``dequantize`` does, each read into fresh memory that is freed when the caller drops it.

The key conversion is ``dit_keys.to_bfl`` itself, run once on stand-ins: each source tensor is replaced by the
column of its global row numbers, so every converted tensor names the source rows it is made of (the namings only
rename, split, concatenate or swap whole rows, E2P-SPEC §3.2). Reading a BFL tensor then takes those rows.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import torch

from ..errors import CheckpointError
from .dit_keys import to_bfl
from .io import FP8_DTYPES, _check_file, _read_safetensors_header, dequantize_tensor, fp8_scale_keys, is_fp8_side_key
from .sniff import strip_prefixes

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class StreamedDiT:
    """The Flux DiT of one safetensors file, any naming: ``shapes`` (BFL key -> meta tensor with the shape and dtype
    that ``read`` returns), ``source_format``, the header's ``metadata``, and ``read(key)``."""

    def __init__(self, path: str | os.PathLike, fp8_dtype: torch.dtype = torch.bfloat16):
        self.path = Path(path)
        self.fp8_dtype = fp8_dtype
        _check_file(self.path)
        header = _read_safetensors_header(self.path)
        with open(self.path, "rb") as handle:
            self._data_start = 8 + struct.unpack("<Q", handle.read(8))[0]
        self.metadata: dict[str, str] = dict(header.pop("__metadata__", None) or {})
        file_keys = strip_prefixes({key: key for key in header})  # stripped name -> name in the file
        self._entries = {name: header[key] for name, key in file_keys.items()}
        self._scale_keys = fp8_scale_keys(self._entries)
        model_keys = [name for name in self._entries if not is_fp8_side_key(name)]

        meta = {name: torch.empty(self._entry_shape(name), dtype=self._read_dtype(name), device="meta")
                for name in model_keys}
        self.shapes, self.source_format = to_bfl(meta)  # checks every key, as loading the whole file would
        self._row_starts: list[tuple[int, str]] = []  # (first global row, source key), ascending
        stand_ins = {}
        next_row = 0
        for name in model_keys:
            shape = self._entry_shape(name)
            rows = shape[0] if shape else 1
            stand_ins[name] = torch.arange(next_row, next_row + rows) if shape else torch.tensor(next_row)
            self._row_starts.append((next_row, name))
            next_row += rows
        self._rows: dict[str, torch.Tensor] = {key: rows.reshape(-1) for key, rows in to_bfl(stand_ins)[0].items()}

    def read(self, key: str) -> torch.Tensor:
        """The BFL tensor ``key``, in new memory owned by the caller."""
        rows = self._rows[key]
        starts = torch.tensor([start for start, _ in self._row_starts])
        sources = torch.searchsorted(starts, rows, right=True) - 1
        pieces = []
        run_begin = 0
        for run_end in range(1, len(rows) + 1):
            if run_end < len(rows) and sources[run_end] == sources[run_begin]:
                continue
            start, name = self._row_starts[int(sources[run_begin])]
            tensor = self._read_model_tensor(name)
            local = rows[run_begin:run_end] - start
            whole = tensor.ndim == 0 or torch.equal(local, torch.arange(tensor.shape[0]))
            pieces.append(tensor if whole else tensor[local])
            run_begin = run_end
        value = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        expected = self.shapes[key]
        if value.shape != expected.shape or value.dtype != expected.dtype:
            raise CheckpointError(f"{self.path.name}: {key} read as {list(value.shape)} {value.dtype}, expected "
                                  f"{list(expected.shape)} {expected.dtype}")
        return value

    def _entry_shape(self, name: str) -> list[int]:
        return list(self._entries[name]["shape"])

    def _read_dtype(self, name: str) -> torch.dtype:
        stored = self._stored_dtype(name)
        return self.fp8_dtype if name in self._scale_keys or stored in FP8_DTYPES else stored

    def _stored_dtype(self, name: str) -> torch.dtype:
        code = self._entries[name]["dtype"]
        if code not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{self.path.name}: tensor {name} has dtype {code}, which this loader cannot read")
        return SAFETENSORS_DTYPES[code]

    def _read_model_tensor(self, name: str) -> torch.Tensor:
        scale_key = self._scale_keys.get(name)
        scale = self._read_raw(scale_key) if scale_key else None
        return dequantize_tensor(name, self._read_raw(name), scale, self.fp8_dtype)

    def _read_raw(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        begin, end = entry["data_offsets"]
        data = torch.empty(end - begin, dtype=torch.uint8)
        with open(self.path, "rb") as handle:
            handle.seek(self._data_start + begin)
            if handle.readinto(data.numpy()) != end - begin:
                raise CheckpointError(f"{self.path} is truncated: tensor {name} is cut short")
        return data.view(self._stored_dtype(name)).reshape(entry["shape"])
