"""The trainable DiT: base weights from any format ``e2p_core`` reads, an optional LoRA, and the exports.

LoRA layout (E2P-SPEC §3.3, §4.10): one rank-r pair per Linear of the BFL DiT inside the blocks -- 10 per double
block and 3 per single block, modulation included, 304 for FLUX -- with ``alpha`` (default: the rank, scale 1).
The diffusers model splits BFL's fused projections (``img_attn.qkv`` -> ``to_q``/``to_k``/``to_v``, ``linear1`` ->
those plus ``proj_mlp``), so peft puts a pair on every piece and the pieces of one BFL Linear then share a single
``lora_A``: the shared ``down`` and the row-split ``up`` are exactly the reference's fused pair (same rank, same
initialisation: kaiming-uniform A over the same fan-in, zero B).

Exports: a LoRA goes out in kohya naming (what E2P releases, ComfyUI's LoRA loader and ``e2p_core`` read), a full
fine-tune as a BFL single file (ComfyUI's UNETLoader, ``e2p_core``). Both record the timestep-embedding variant
under the safetensors metadata key ``e2p.time_embedding``, which ``e2p_core.weights.load_dit`` reads back.
"""

import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

from e2p_core.backends.diffusers_backend import ReferenceFluxTransformer, build_transformer
from e2p_core.checkpoints import bfl_to_diffusers, diffusers_to_bfl, load_lora, lora_to_kohya, save_safetensors_atomic
from e2p_core.checkpoints.dit_keys import module_table
from e2p_core.checkpoints.lora import LORA_METADATA_KEY
from e2p_core.errors import CheckpointError
from e2p_core.time_embedding import TimeEmbedding
from e2p_core.weights import TIME_EMBEDDING_METADATA_KEY, DiTWeights

ADAPTER = "default"
TRAINED_TIME_EMBEDDINGS = ("bf16", "exact")  # a trained model records a concrete variant, never "reference"


def lora_groups(transformer: ReferenceFluxTransformer) -> list[tuple[str, ...]]:
    """The LoRA targets: for each BFL Linear inside the blocks, the diffusers module names that make it up."""
    table = module_table(len(transformer.transformer_blocks), len(transformer.single_transformer_blocks))
    return [m.diffusers for m in table if m.kind == "linear" and m.bfl.startswith(("double_blocks.", "single_blocks."))]


def build_trainable_transformer(dit: DiTWeights, time_embedding: TimeEmbedding, dtype: torch.dtype,
                                device: torch.device | str) -> ReferenceFluxTransformer:
    """The base DiT in diffusers layout with the given (concrete) time-embedding variant, frozen."""
    if time_embedding not in TRAINED_TIME_EMBEDDINGS:
        raise ValueError(f"train with a concrete time embedding {TRAINED_TIME_EMBEDDINGS}, not {time_embedding!r}")
    return build_transformer(bfl_to_diffusers(dit.state_dict_bfl), dit.architecture, dtype, device, time_embedding)


def add_lora(transformer: ReferenceFluxTransformer, rank: int, alpha: float | None = None,
             dtype: torch.dtype = torch.float32) -> int:
    """Inject the reference LoRA (peft, adapter ``default``) and tie the ``lora_A`` of fused pieces.

    Only the LoRA parameters are trainable afterwards. Returns the number of BFL-level pairs (304 for FLUX).
    """
    groups = lora_groups(transformer)
    config = LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, lora_dropout=0.0, bias="none",
                        init_lora_weights=True, target_modules=[name for group in groups for name in group])
    inject_adapter_in_model(config, transformer, adapter_name=ADAPTER)
    modules = dict(transformer.named_modules())
    for group in groups:
        shared = modules[group[0]].lora_A[ADAPTER].weight
        for name in group[1:]:
            modules[name].lora_A[ADAPTER].weight = shared
    transformer.requires_grad_(False)
    for name, parameter in transformer.named_parameters():
        if ".lora_" in name:
            parameter.data = parameter.data.to(dtype)
            parameter.requires_grad_(True)
    return len(groups)


def make_full_trainable(transformer: ReferenceFluxTransformer, dtype: torch.dtype) -> None:
    """Full fine-tune: every DiT parameter trains, stored in ``dtype``."""
    for parameter in transformer.parameters():
        parameter.data = parameter.data.to(dtype)
    transformer.requires_grad_(True)


def trainable_state_dict(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name, each tied parameter once (what a checkpoint stores)."""
    return {name: p.detach() for name, p in transformer.named_parameters() if p.requires_grad}


def load_trainable_state_dict(transformer: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Put checkpointed trainable parameters back; every trainable parameter must be there, nothing else."""
    expected = set(trainable_state_dict(transformer))
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise CheckpointError(f"{source} does not match the model being trained (LoRA rank or mode changed?): "
                         f"missing {missing[:3]}, unexpected {extra[:3]}")
    parameters = dict(transformer.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            parameters[name].copy_(value)


def has_lora(transformer: torch.nn.Module) -> bool:
    return any(".lora_A." in name for name, _ in transformer.named_parameters())


def export_lora(transformer: ReferenceFluxTransformer, path: str | Path, dtype: torch.dtype,
                metadata: dict[str, str], state_dict: dict[str, torch.Tensor] | None = None) -> int:
    """Write the LoRA in kohya naming (``lora_unet_*`` + ``.alpha``); returns the number of pairs written.

    ``state_dict`` is the model's full state dict when it had to be gathered (FSDP, DeepSpeed).
    """
    lora_sd = get_peft_model_state_dict(transformer, state_dict=state_dict, adapter_name=ADAPTER)
    peft_sd = {key: value.detach().to("cpu", dtype) for key, value in lora_sd.items()}
    config = transformer.peft_config[ADAPTER]
    header = {LORA_METADATA_KEY: json.dumps({"r": config.r, "lora_alpha": config.lora_alpha})}
    pairs = load_lora(peft_sd, header)  # e2p_core fuses the tied pieces back into one pair per BFL Linear
    save_safetensors_atomic(lora_to_kohya(pairs), path, metadata)
    return len(pairs)


def export_full(transformer: ReferenceFluxTransformer, path: str | Path, dtype: torch.dtype,
                metadata: dict[str, str], state_dict: dict[str, torch.Tensor] | None = None) -> int:
    """Write the whole DiT in BFL naming (a ComfyUI diffusion model); returns the number of tensors."""
    state_dict = transformer.state_dict() if state_dict is None else state_dict
    bfl = diffusers_to_bfl({key: value.detach().to("cpu", dtype) for key, value in state_dict.items()})
    save_safetensors_atomic(bfl, path, metadata)
    return len(bfl)


def export_metadata(task: str, time_embedding: TimeEmbedding, step: int) -> dict[str, str]:
    return {TIME_EMBEDDING_METADATA_KEY: time_embedding, "e2p.task": task, "e2p.step": str(step), "format": "pt"}

