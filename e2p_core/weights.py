"""Load Edit2Perceive weights from whatever the user has, into one canonical form.

The DiT may be a BFL single file (FLUX.1 Kontext as ComfyUI has it, possibly fp8), an E2P full checkpoint in
DiffSynth naming, or a diffusers folder; task LoRAs may be in any key style ``checkpoints.lora`` reads. Everything
is brought to BFL naming with the LoRAs merged, plus the architecture read from the shapes. The VAE is the Flux
``ae.safetensors`` (BFL naming) or a diffusers ``vae`` folder.

A DiT file or a LoRA may record the timestep-embedding variant it was trained with in its safetensors metadata under
``e2p.time_embedding`` (``python -m train`` writes it); :func:`load_dit` returns it so callers can default to it. A
LoRA's record wins over the base file's: it describes the fine-tuned model.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .checkpoints import (
    DiTArchitecture,
    VAEArchitecture,
    dequantize,
    infer_dit_architecture,
    infer_vae_architecture,
    load_config_json,
    load_diffusers_folder,
    load_lora_file,
    load_state_dict,
    merge_lora_in_place,
    read_metadata,
    strip_prefixes,
    to_bfl,
    vae_to_diffusers,
)
from .checkpoints.io import SAFETENSORS_SUFFIXES, read_header
from .connector import CONNECTOR_PREFIX, ConnectorArchitecture, infer_connector_architecture, split_connector
from .errors import CheckpointError
from .time_embedding import TimeEmbedding, check_time_embedding

TIME_EMBEDDING_METADATA_KEY = "e2p.time_embedding"
# FLUX's guidance embedder in BFL, DiffSynth and diffusers naming; Step1X-Edit has none.
GUIDANCE_EMBEDDER_KEYS = ("guidance_in.in_layer.weight", "guidance_embedder.timestep_embedder.0.weight",
                          "time_text_embed.guidance_embedder.linear_1.weight")


@dataclass
class DiTWeights:
    state_dict_bfl: dict[str, torch.Tensor]
    architecture: DiTArchitecture
    source_format: str  # "bfl" | "diffsynth" | "diffusers"
    time_embedding: TimeEmbedding | None  # as recorded in the file, None when the file does not say


@dataclass
class VAEWeights:
    state_dict_diffusers: dict[str, torch.Tensor]
    architecture: VAEArchitecture


def load_dit(
    path: str | Path,
    config: str | Path | dict[str, Any] | None = None,
    loras: list[tuple[str | Path, float]] = (),
    fp8_dtype: torch.dtype = torch.bfloat16,
) -> DiTWeights:
    """Any DiT checkpoint -> BFL-named state dict with the LoRAs (path, strength) merged, and its architecture.

    ``config`` is a diffusers-style ``config.json`` (path or dict) for non-standard sizes; a diffusers folder brings
    its own. fp8 weights are upcast to ``fp8_dtype`` (scaled-fp8 scales applied).
    """
    path = Path(path)
    if path.is_dir():
        state_dict, folder_config = load_diffusers_folder(path, subfolder="transformer")
        metadata = {}
    else:
        state_dict, folder_config = load_state_dict(path), {}
        metadata = read_metadata(path) if path.suffix in SAFETENSORS_SUFFIXES else {}
    config = load_config_json(config) if isinstance(config, (str, Path)) else (config or folder_config)
    check_dit_family(strip_prefixes(state_dict), path.name, "e2p")
    state_dict_bfl, source_format = to_bfl(dequantize(state_dict, fp8_dtype))
    architecture = infer_dit_architecture(state_dict_bfl, config)
    # The state dict is ours alone: merging in place keeps one copy of the model (for a safetensors file, the merged
    # layers' pages of its private mapping), not the file's pages plus a merged copy.
    merge_loras_in_place(state_dict_bfl, loras, architecture.mlp_ratio, family="e2p")
    return DiTWeights(state_dict_bfl, architecture, source_format, recorded_time_embedding(loras, metadata))


_OTHER_FAMILY_LORA = {
    "e2p": "looks like FE2E's Step1X-Edit LoRA (kohya sd-scripts format with a float alpha of rank/2), not a FLUX "
           "Kontext / Edit2Perceive LoRA; run it with --model fe2e",
    "fe2e": "is an Edit2Perceive (FLUX Kontext) LoRA, not one for Step1X-Edit: FE2E takes its own LoRA "
            "(LDRN.safetensors); run this one with --model e2p",
}


def check_lora_family(lora_path: str | Path, family: str) -> None:
    """Refuse a LoRA written for the other model family (when its file tells; see :func:`lora_family`)."""
    found = lora_family(lora_path)
    if found is not None and found != family:
        raise CheckpointError(f"{Path(lora_path).name} {_OTHER_FAMILY_LORA[family]}")


def check_dit_family(state_dict: dict[str, torch.Tensor], name: str, family: str) -> None:
    """Refuse a DiT of the other family: Step1X-Edit (FE2E) files carry ``connector.*`` and no guidance embedder,
    FLUX Kontext / Edit2Perceive files no connector. ``state_dict`` has its wrapper prefixes stripped."""
    has_connector = any(key.startswith(CONNECTOR_PREFIX) for key in state_dict)
    if family == "e2p" and has_connector:
        raise CheckpointError(f"{name} is a Step1X-Edit (FE2E) checkpoint (it has connector.* tensors), not a FLUX "
                              f"Kontext / Edit2Perceive DiT; run it as FE2E (--model fe2e, or the FE2E Model Loader "
                              f"node)")
    if family == "fe2e" and not has_connector:
        raise CheckpointError(f"{name} has no connector.* tensors: it is not a Step1X-Edit (FE2E) checkpoint but a "
                              f"FLUX / Edit2Perceive DiT; run it as Edit2Perceive (--model e2p, or the Edit2Perceive "
                              f"Model Loader node)")
    if family == "fe2e" and any(key in state_dict for key in GUIDANCE_EMBEDDER_KEYS):
        raise CheckpointError(f"{name} has a guidance embedder; Step1X-Edit has none (is it a FLUX DiT?)")


def merge_loras_in_place(state_dict_bfl: dict[str, torch.Tensor], loras: list[tuple[str | Path, float]],
                         mlp_ratio: float, family: str) -> None:
    """Merge the (path, strength) LoRAs into the weights of a BFL state dict of the ``family`` model, refusing the
    other family's; in place (``checkpoints.merge_lora_in_place``), so only for a state dict the caller owns."""
    for lora_path, strength in loras:
        check_lora_family(lora_path, family)
        lora = load_lora_file(lora_path, mlp_ratio)
        merge_lora_in_place(state_dict_bfl, lora, strength, source=Path(lora_path).name)


def recorded_time_embedding(
    loras: list[tuple[str | Path, float]], base_metadata: dict[str, str] | None = None
) -> TimeEmbedding | None:
    """The timestep-embedding variant the LoRAs record, else the one in the base file's ``base_metadata``; None when
    neither says. A LoRA's record wins: it describes the fine-tuned model. LoRAs that disagree are an error."""
    recorded = {}
    for lora_path, _ in loras:
        if Path(lora_path).suffix in SAFETENSORS_SUFFIXES:
            variant = read_metadata(lora_path).get(TIME_EMBEDDING_METADATA_KEY)
            if variant is not None:
                recorded[str(lora_path)] = variant
    if len(set(recorded.values())) > 1:
        raise CheckpointError(f"these LoRAs were trained with different timestep embeddings ({recorded}); "
                              f"they cannot be applied together")
    variant = next(iter(recorded.values()), None) or (base_metadata or {}).get(TIME_EMBEDDING_METADATA_KEY)
    return check_time_embedding(variant) if variant is not None else None


def load_vae(path: str | Path, config: str | Path | dict[str, Any] | None = None) -> VAEWeights:
    """The Flux VAE (BFL ``ae.safetensors`` or a diffusers folder) in diffusers naming, and its architecture."""
    path = Path(path)
    if path.is_dir():
        state_dict, folder_config = load_diffusers_folder(path, subfolder="vae")
    else:
        state_dict, folder_config = load_state_dict(path), {}
    config = load_config_json(config) if isinstance(config, (str, Path)) else (config or folder_config)
    state_dict_diffusers = vae_to_diffusers(state_dict)
    return VAEWeights(state_dict_diffusers, infer_vae_architecture(state_dict_diffusers, config))


@dataclass
class Step1XWeights:
    """FE2E's model: the Step1X-Edit DiT (BFL naming, LoRA merged) and its Qwen2Connector."""

    dit: DiTWeights
    connector_state_dict: dict[str, torch.Tensor]  # ``connector.*`` tensors without the prefix
    connector_architecture: ConnectorArchitecture


def load_step1x(
    path: str | Path,
    config: str | Path | dict[str, Any] | None = None,
    loras: list[tuple[str | Path, float]] = (),
    dtype: torch.dtype | None = None,
) -> Step1XWeights:
    """``step1x-edit-i1258.safetensors`` (or its FP8 variant) + the FE2E LoRA -> :class:`Step1XWeights`.

    ``config`` is a diffusers-style DiT config that may carry a ``connector`` object (``in_channels``,
    ``hidden_size``, ``num_attention_heads``, ``depth``, ``mlp_ratio``) for non-standard sizes. ``dtype`` is the
    compute dtype: the reference casts the model to it BEFORE merging the LoRAs, which it merges like kohya's
    merger, ``W + strength * alpha/rank * up @ down`` in float32, cast back (fp8 files are upcast to ``dtype``,
    bf16 when None).
    """
    path = Path(path)
    config = load_config_json(config) if isinstance(config, (str, Path)) else dict(config or {})
    state_dict = strip_prefixes(load_state_dict(path))
    dit_state_dict, connector_state_dict = split_connector(state_dict)
    check_dit_family(state_dict, path.name, "fe2e")
    state_dict_bfl, source_format = to_bfl(dequantize(dit_state_dict, dtype or torch.bfloat16))
    if dtype is not None:
        state_dict_bfl = {key: value.to(dtype) for key, value in state_dict_bfl.items()}
    architecture = infer_dit_architecture(state_dict_bfl, config)
    merge_loras_in_place(state_dict_bfl, loras, architecture.mlp_ratio, family="fe2e")
    connector_state_dict = dequantize(connector_state_dict, dtype or torch.bfloat16)
    connector_architecture = infer_connector_architecture(connector_state_dict, config.get("connector"))
    check_connector_fits(connector_architecture, architecture, path.name)
    dit = DiTWeights(state_dict_bfl, architecture, source_format, None)
    return Step1XWeights(dit, connector_state_dict, connector_architecture)


def check_connector_fits(connector: ConnectorArchitecture, dit: DiTArchitecture, name: str) -> None:
    if connector.hidden_size != dit.text_dim:
        raise CheckpointError(f"{name}: the connector is {connector.hidden_size} wide but the DiT's txt_in takes "
                              f"{dit.text_dim}")


FE2E_LORA_SCALE = 0.5  # FE2E's LoRA: rank 64, alpha 32


def lora_family(path: str | Path) -> str | None:
    """Which model family a kohya LoRA file was written for: ``"e2p"``, ``"fe2e"`` or None (cannot tell).

    FLUX.1 Kontext and Step1X-Edit have the same module names and shapes, so only how the file was written can tell:
    Edit2Perceive's LoRAs (DiffSynth's kohya export, ``python -m train``) record ``e2p.time_embedding`` or store
    ``alpha`` = rank as an integer tensor; FE2E's (kohya sd-scripts' LoRA network) store a float ``alpha`` of half the
    rank. Other files (PEFT styles, community LoRAs with other scales) are None.
    """
    path = Path(path)
    if path.suffix not in SAFETENSORS_SUFFIXES:
        return None
    header = read_header(path)  # dtypes and shapes: the LoRA's matrices are read once, by its loader, not here
    if TIME_EMBEDDING_METADATA_KEY in (header.get("__metadata__") or {}):
        return "e2p"
    alpha_keys = [key for key in header if key.startswith("lora_unet_") and key.endswith(".alpha")]
    if not alpha_keys:
        return None
    float_alphas = [header[key]["dtype"].startswith(("F", "BF")) for key in alpha_keys]
    if not any(float_alphas):
        return "e2p"
    if not all(float_alphas):
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            scales = {float(handle.get_tensor(key)) / header[down]["shape"][0] for key in alpha_keys
                      if (down := key.removesuffix(".alpha") + ".lora_down.weight") in header}
    except Exception as exc:  # safetensors' own error type, or alphas and shapes that are not what a LoRA holds
        raise CheckpointError(f"{path} is not a readable LoRA file: {exc}") from exc
    return "fe2e" if scales == {FE2E_LORA_SCALE} else None
