"""Reading and writing weight files: safetensors, legacy PyTorch files (safely), diffusers folders, fp8 upcasting.

Every failure is a ``CheckpointError`` that names the file and says what the file looks like, because the usual
causes are user-side (a wrong path, an interrupted download, a pickle renamed to ``.safetensors``).
Legacy ``.pt/.pth/.bin/.ckpt`` files are read only with ``torch.load(weights_only=True)``: pickle code is never run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
import tempfile
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterable, Iterator

import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError, shortened

LEGACY_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
DIFFUSERS_LEGACY_WEIGHTS = "diffusion_pytorch_model.bin"
SAFETENSORS_MAX_HEADER_BYTES = 100_000_000  # the format's own limit (safetensors refuses larger headers)

FP8_DTYPES = tuple(
    getattr(torch, name)
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, name)
)
# ComfyUI "scaled fp8": W = stored_fp8 * scale; the scale sits next to the weight under one of these names.
FP8_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
FP8_DROPPED_KEY = re.compile(r"(^|\.)(scaled_fp8|input_scale)$")

_CONVERT_HINT = (
    "rename it to .pt so it is read safely with torch.load(weights_only=True), or convert it with "
    "`python -c \"import torch, safetensors.torch as s; s.save_file(torch.load('in.pt', weights_only=True), "
    "'out.safetensors')\"`"
)


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load all tensors of a weight file (or of a diffusers model folder) to CPU."""
    path = Path(path)
    if path.is_dir():
        return load_diffusers_folder(path)[0]
    _check_file(path)
    kind, suffix = _sniff_file_kind(path), path.suffix.lower()
    if kind == "gguf":
        raise CheckpointError(f"{path} is a GGUF file; this loader reads safetensors (GGUF needs a GGUF loader)")
    if suffix in LEGACY_SUFFIXES and kind != "safetensors":
        return _load_legacy(path)
    if kind in ("zip", "pickle"):
        if suffix in SAFETENSORS_SUFFIXES:
            raise CheckpointError(
                f"{path} looks like a PyTorch pickle/zip archive, not safetensors (despite its name); {_CONVERT_HINT}"
            )
        return _load_legacy(path)
    _read_safetensors_header(path)  # precise messages for truncated or corrupt files
    try:
        return load_file(path, device="cpu")
    except Exception as exc:  # safetensors raises its own error type; re-raise as a user-facing message
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The checked safetensors header: ``{name: {"dtype", "shape", "data_offsets"}}`` and ``__metadata__``; no tensor
    data is read."""
    path = Path(path)
    _check_file(path)
    return _read_safetensors_header(path)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Return the ``__metadata__`` strings of a safetensors header ({} when there are none)."""
    return dict(read_header(path).get("__metadata__") or {})


def stage_file(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Run ``write(temp_path)`` on a temporary file beside ``path`` and return it, complete and synced.

    The caller makes it visible with ``os.replace(temp, path)`` (same folder, so the rename is atomic); staging
    several files first lets a command publish all of its outputs or none.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp_name)
        with open(tmp_name, "rb+") as handle:
            os.fsync(handle.fileno())  # data on disk before the rename makes it visible
        os.chmod(tmp_name, 0o644)  # mkstemp creates 0600; a saved file should be readable like any other
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return Path(tmp_name)


def write_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """``write`` to ``path`` so that a crash or error never leaves a half-written or clobbered file."""
    os.replace(stage_file(path, write), path)


def save_safetensors_atomic(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Write ``tensors`` (and string ``metadata``) to ``path`` atomically; see :func:`write_atomically`."""
    path = Path(path)
    bad = [key for key, value in tensors.items() if not isinstance(value, torch.Tensor)]
    if bad:
        raise CheckpointError(f"cannot save {path}: values of {bad[:3]} are not tensors")
    if metadata is not None and not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"cannot save {path}: safetensors metadata values must be strings")
    prepared = _unshared_contiguous(tensors)
    try:
        write_atomically(path, lambda tmp_name: save_file(prepared, tmp_name, metadata=metadata))
    except Exception as exc:
        raise CheckpointError(f"could not write {path}: {exc}") from exc


@contextlib.contextmanager
def weights_must_fit(what: str) -> Iterator[None]:
    """Turn torch's ``load_state_dict`` mismatch error (a RuntimeError listing wrong sizes or missing keys) into a
    CheckpointError naming ``what``: a checkpoint whose other tensors contradict the sizes it was read as."""
    try:
        yield
    except RuntimeError as exc:
        if "in loading state_dict" not in str(exc):
            raise
        details = "; ".join(line.strip() for line in str(exc).splitlines()[1:4])
        raise CheckpointError(f"{what} does not fit the model its shapes describe (corrupt or mixed checkpoint?): "
                              f"{details}") from None


def load_config_json(path: str | os.PathLike) -> dict[str, Any]:
    """Read a JSON config (a ``config.json`` file, or a folder holding one) into a dict."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    _check_file(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, absurd numbers or nesting
        raise CheckpointError(f"{path} is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object (a dict of settings), got {type(config).__name__}")
    return config


def load_diffusers_folder(
    folder: str | os.PathLike, subfolder: str = "transformer"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a diffusers model folder (``config.json`` + weights, single or sharded) as (state_dict, config).

    ``folder`` may also be a pipeline root; then its ``subfolder`` (``transformer`` or ``vae``) is used.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"diffusers folder {folder.name!r} not found in {folder.parent.resolve()}")
    if (folder / subfolder / "config.json").is_file():
        folder = folder / subfolder
    elif not (folder / "config.json").is_file():
        raise CheckpointError(
            f"{folder} is neither a diffusers model folder (no config.json) nor a pipeline folder with "
            f"{subfolder}/config.json; it contains: {sorted(p.name for p in folder.iterdir())[:10]}"
        )
    config = load_config_json(folder / "config.json")
    if (folder / DIFFUSERS_WEIGHTS).is_file():
        return load_state_dict(folder / DIFFUSERS_WEIGHTS), config
    if (folder / DIFFUSERS_INDEX).is_file():
        return _load_sharded(folder / DIFFUSERS_INDEX), config
    if (folder / DIFFUSERS_LEGACY_WEIGHTS).is_file():
        return _load_legacy(folder / DIFFUSERS_LEGACY_WEIGHTS), config
    raise CheckpointError(
        f"{folder} has a config.json but no {DIFFUSERS_WEIGHTS}, {DIFFUSERS_INDEX} or {DIFFUSERS_LEGACY_WEIGHTS}"
    )


def has_fp8_scales(sd: dict[str, torch.Tensor]) -> bool:
    """True when ``sd`` is a ComfyUI "scaled fp8" checkpoint that needs ``dequantize`` before use."""
    return any(is_fp8_side_key(key) for key in sd)


def dequantize(sd: dict[str, torch.Tensor], dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Upcast fp8 tensors to ``dtype``, applying ComfyUI scaled-fp8 per-layer scales; other tensors are kept.

    ``<layer>.scale_weight`` / ``<layer>.weight_scale`` multiply ``<layer>.weight``; the ``scaled_fp8`` marker and
    activation ``input_scale`` keys are dropped (they only matter to fp8 matmul kernels).
    """
    scale_keys = fp8_scale_keys(sd)
    return {key: dequantize_tensor(key, value, sd[scale_keys[key]] if key in scale_keys else None, dtype)
            for key, value in sd.items() if not is_fp8_side_key(key)}


def fp8_scale_keys(keys: Iterable[str]) -> dict[str, str]:
    """Weight key -> the key of its scaled-fp8 scale, for the weights that have one."""
    keys = set(keys)
    scale_keys = {key[: -len(suffix)] + ".weight": key
                  for key in keys for suffix in FP8_SCALE_SUFFIXES if key.endswith(suffix)}
    orphans = sorted(weight for weight in scale_keys if weight not in keys)
    if orphans:
        raise CheckpointError(f"fp8 scales without a weight: {orphans[:3]}")
    return scale_keys


def is_fp8_side_key(key: str) -> bool:
    """A scale, marker or activation-scale key of a scaled-fp8 file: not a weight of the model."""
    return key.endswith(FP8_SCALE_SUFFIXES) or FP8_DROPPED_KEY.search(key) is not None


def dequantize_tensor(key: str, value: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """One tensor of :func:`dequantize`: ``value * scale`` in float32 then ``dtype`` when it has a scale, fp8 upcast
    to ``dtype``, anything else as it is."""
    if scale is not None:
        return (value.to(torch.float32) * _broadcast_scale(key, scale, value)).to(dtype)
    return value.to(dtype) if value.dtype in FP8_DTYPES else value


def _broadcast_scale(key: str, scale: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    scale = scale.to(torch.float32)
    if scale.numel() == 1:
        return scale.reshape(())
    if scale.numel() == weight.shape[0]:  # per-output-channel scales
        return scale.reshape(-1, *([1] * (weight.dim() - 1)))
    raise CheckpointError(f"fp8 scale of {key} has shape {list(scale.shape)}, weight has {list(weight.shape)}")


def _check_file(path: Path) -> None:
    if not path.exists():
        folder = path.parent.resolve()
        hint = ""
        if folder.is_dir():
            weight_suffixes = SAFETENSORS_SUFFIXES + LEGACY_SUFFIXES
            near = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in weight_suffixes)
            hint = f"; weight files there: {near[:10]}" if near else "; that folder holds no weight files"
        else:
            hint = "; that folder does not exist"
        raise CheckpointError(f"file {path.name!r} not found in folder {folder}{hint}")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a regular file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes); the download or copy was probably interrupted")


def _sniff_file_kind(path: Path) -> str:
    """Guess the container from the first bytes: zip (torch.save), pickle, gguf, safetensors or unknown."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    if head.startswith(b"GGUF"):
        return "gguf"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    return "unknown"


def _read_safetensors_header(path: Path) -> dict[str, Any]:
    """Parse and sanity-check a safetensors header (8-byte little-endian length, then JSON)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw_len = handle.read(8)
        if len(raw_len) < 8:
            raise CheckpointError(f"{path} is too short ({size} bytes) to be a safetensors file (truncated?)")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > SAFETENSORS_MAX_HEADER_BYTES:
            raise CheckpointError(f"{path} is corrupt or not a safetensors file: its header claims {header_len} bytes, "
                                  f"more than the format's limit of {SAFETENSORS_MAX_HEADER_BYTES}")
        if header_len > size - 8:
            raise CheckpointError(
                f"{path} is truncated or not a safetensors file: its header claims {header_len} bytes but the file "
                f"has {size} bytes"
            )
        try:
            header = json.loads(handle.read(header_len))
        except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, absurd numbers or nesting
            raise CheckpointError(f"{path} is corrupt or not a safetensors file: the header is not JSON") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is corrupt: the safetensors header is not a JSON object")
    data_end = max((_tensor_data_end(path, key, info) for key, info in header.items()), default=0)
    available = size - 8 - header_len
    if data_end > available:
        raise CheckpointError(
            f"{path} is truncated: the header lists {data_end} bytes of tensor data but only {available} are present "
            f"(download incomplete? re-download the file)"
        )
    return header


def _tensor_data_end(path: Path, key: str, info: Any) -> int:
    """Where the bytes of header entry ``key`` end (0 for ``__metadata__``), once its layout is checked."""
    if key == "__metadata__":
        if info is not None and not (isinstance(info, dict) and all(isinstance(v, str) for v in info.values())):
            raise CheckpointError(f"{path} is corrupt: its safetensors __metadata__ is not a map of strings")
        return 0
    offsets = info.get("data_offsets") if isinstance(info, dict) else None
    valid = (isinstance(offsets, list) and len(offsets) == 2
             and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
             and offsets[0] <= offsets[1] and isinstance(info.get("dtype"), str)
             and isinstance(info.get("shape"), list))
    if not valid:
        raise CheckpointError(f"{path} is corrupt: the safetensors header entry of {shortened(key)} is not "
                              f"{{dtype, shape, data_offsets: [begin, end]}}")
    return offsets[1]


def _load_legacy(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for unsafe pickles, RuntimeError for broken archives
        raise CheckpointError(
            f"{path} could not be read with torch.load(weights_only=True): it is corrupt or contains Python objects "
            f"beyond tensors, and running its pickle code is unsafe, so it is refused. Re-save its tensors as "
            f".safetensors in a trusted environment. Details: {str(exc).splitlines()[0] if str(exc) else exc!r}"
        ) from exc
    # Lightning / training checkpoints wrap the weights: {"state_dict": {...}, "epoch": ...}.
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a dict of tensors")
    bad = [key for key, value in obj.items() if not isinstance(value, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path} is not a plain state dict: entries {bad[:3]} are not tensors")
    return obj


def _load_sharded(index_path: Path) -> dict[str, torch.Tensor]:
    index = load_config_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path} has no 'weight_map'")
    sd: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        sd.update(load_state_dict(index_path.parent / shard))
    missing = sorted(set(weight_map) - set(sd))
    if missing:
        raise CheckpointError(f"{index_path} lists tensors that no shard contains, e.g. {missing[:3]}")
    return sd


def _unshared_contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Make every tensor contiguous; clone those overlapping an earlier one (safetensors refuses shared bytes).

    Disjoint views of one storage (the split q/k/v of a converted DiT) are fine and are not copied.
    """
    used: dict[int, list[tuple[int, int]]] = {}  # storage pointer -> byte ranges already taken
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        value = value.detach().contiguous()
        if value.numel():
            start = value.storage_offset() * value.element_size()
            end = start + value.numel() * value.element_size()
            taken = used.setdefault(value.untyped_storage().data_ptr(), [])
            if any(s < end and start < e for s, e in taken):
                value = value.clone()
            else:
                taken.append((start, end))
        out[key] = value
    return out
