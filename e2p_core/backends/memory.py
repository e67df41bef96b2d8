"""How the DiT's weights are held while it runs: the ``memory_mode`` of ``load_diffusers_backend``.

* ``full``: every weight in the compute dtype on the device (bf16: 22.2 GiB for FLUX.1 Kontext; the default).
* ``fp8``: Linear weights stored as float8_e4m3fn and cast to the compute dtype layer by layer as they run (diffusers
  layerwise casting). Norms, the q/k RMSNorms and the adaLN modulation Linears stay in the compute dtype, as in
  diffusers' Flux default: about 14 GiB, for 16-24 GB cards.
* ``offload``: weights in the compute dtype in (pinned) host memory; each transformer block is copied to the device
  just before it runs, on a side CUDA stream that overlaps the copy of block i+1 with the compute of block i
  (diffusers block-level group offloading). About one block on the device: for 8-12 GB cards.
* ``fp8-offload``: both; half the bytes to copy per block.
* ``gguf``: weights kept in GGUF block quantisation (Q8_0, Q4_K, ... as read from a city96-style ``.gguf`` file, or
  Q8_0 quantised on load from any other file) and dequantised per layer as it runs; see ``backends.gguf``.

The VAE is always held in full (168 MB in bf16). All modes compute in the compute dtype; only the stored weights
differ, so ``full`` stays the reference the others are measured against.
"""

from typing import Literal, get_args

import torch

from ..errors import InputError

MemoryMode = Literal["full", "fp8", "offload", "fp8-offload", "gguf"]
MEMORY_MODES: tuple[str, ...] = get_args(MemoryMode)

FP8_STORAGE_DTYPE = torch.float8_e4m3fn
# Module-name patterns that keep their weights in the compute dtype under fp8 storage: diffusers' Flux default
# (``_skip_layerwise_casting_patterns``). "norm" covers our ReferenceRMSNorm q/k norms (not Linears, so never cast
# anyway) and the adaLN modulation Linears (``norm1.linear``, ``norm.linear``, ``norm_out.linear``), whose outputs
# scale every activation.
FP8_KEEP_PATTERNS = ("pos_embed", "norm")
OFFLOAD_BLOCKS_PER_GROUP = 1


def check_memory_mode(mode: str) -> MemoryMode:
    if mode not in MEMORY_MODES:
        raise InputError(f"unknown memory mode {mode!r}; expected one of {', '.join(MEMORY_MODES)}")
    return mode  # type: ignore[return-value]


def builds_on_host(mode: MemoryMode) -> bool:
    """Whether the transformer is built on the CPU and placed afterwards (fp8 casts and offloading start there)."""
    return mode in ("fp8", "offload", "fp8-offload")


def place_transformer(transformer: torch.nn.Module, mode: MemoryMode, compute_dtype: torch.dtype,
                      device: torch.device) -> None:
    """Apply fp8 storage and/or block offloading to a transformer built on the CPU, and put it on ``device``."""
    if mode in ("fp8", "fp8-offload"):
        # Cast on the host first, so the device only ever holds the fp8 copy.
        transformer.enable_layerwise_casting(storage_dtype=FP8_STORAGE_DTYPE, compute_dtype=compute_dtype,
                                             skip_modules_pattern=FP8_KEEP_PATTERNS)
    if mode in ("offload", "fp8-offload"):
        from diffusers.hooks import apply_group_offloading

        apply_group_offloading(transformer, onload_device=device, offload_device=torch.device("cpu"),
                               offload_type="block_level", num_blocks_per_group=OFFLOAD_BLOCKS_PER_GROUP,
                               use_stream=device.type == "cuda")
    else:
        transformer.to(device)
    if mode == "fp8":
        _copy_host_weights_kept_in_compute_dtype(transformer)


def _copy_host_weights_kept_in_compute_dtype(transformer: torch.nn.Module) -> None:
    """Give the weights that fp8 storage leaves in the compute dtype (norms, modulation, biases) their own memory
    when they stay on the host: adopted as they were, they would keep the whole checkpoint file mapped (and its
    pages resident) for as long as the model lives, though the fp8 copies replaced nearly all of it."""
    for tensor in [*transformer.parameters(), *transformer.buffers()]:
        if tensor.device.type == "cpu" and tensor.dtype != FP8_STORAGE_DTYPE:
            tensor.data = tensor.data.clone()
