"""Load an Edit2Perceive DiT (+ task LoRA) as a native ComfyUI MODEL.

Any checkpoint e2p_core reads becomes a BFL-named state dict and goes to ComfyUI's own Flux loader, so the result is
a ModelPatcher like core ``UNETLoader``'s: fp8 storage, offloading and LoRA stacking work as for any Flux model. The
task LoRA, in whichever key style it was saved, is converted to kohya naming and added as ModelPatcher patches
(``comfy.lora``), so the base weights stay untouched and ComfyUI applies it when it loads the model.

The timestep-embedding variant a file records (``e2p.time_embedding``, see ``e2p_core.weights``) is attached to the
ModelPatcher; the perceive node reads it.
"""

import logging
from pathlib import Path

import comfy.lora
import comfy.model_detection
import comfy.model_management
import comfy.sd
import comfy.utils
import torch
from comfy.model_patcher import ModelPatcher

from ..e2p_core.checkpoints import (
    DiTArchitecture,
    check_lora_fits,
    infer_dit_architecture,
    load_config_json,
    load_lora_file,
    load_state_dict,
    lora_to_kohya,
    read_metadata,
    sniff_dit_format,
    strip_prefixes,
    to_bfl,
    weights_must_fit,
)
from ..e2p_core.checkpoints.arch import FLUX_AXES_DIMS_ROPE
from ..e2p_core.checkpoints.io import SAFETENSORS_SUFFIXES
from ..e2p_core.errors import CheckpointError
from ..e2p_core.weights import check_dit_family, check_lora_family, recorded_time_embedding
from .model_files import choices, full_path, unknown_choice

logger = logging.getLogger(__name__)

TIME_EMBEDDING_ATTACHMENT = "e2p_time_embedding"
WEIGHT_DTYPES = ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")  # as core UNETLoader
NO_LORA = "none"
FLUX_NUM_HEADS = 24  # what ComfyUI's Flux detection assumes (comfy/model_detection.py)


def model_options_for(weight_dtype: str) -> dict:
    """``model_options`` of ``comfy.sd.load_diffusion_model`` for a core UNETLoader ``weight_dtype`` choice."""
    if weight_dtype not in WEIGHT_DTYPES:
        raise CheckpointError(f"weight_dtype must be one of {WEIGHT_DTYPES}, got {weight_dtype!r}")
    options: dict = {}
    if weight_dtype.startswith("fp8_e4m3fn"):
        options["dtype"] = torch.float8_e4m3fn
    elif weight_dtype == "fp8_e5m2":
        options["dtype"] = torch.float8_e5m2
    if weight_dtype == "fp8_e4m3fn_fast":
        options["fp8_optimizations"] = True
    return options


def load_e2p_model(dit_path: str | Path, weight_dtype: str = "default", lora_path: str | Path | None = None,
                   lora_strength: float = 1.0) -> ModelPatcher:
    """A DiT file (BFL incl. fp8, E2P DiffSynth, diffusers naming) + optional LoRA -> a ComfyUI Flux ModelPatcher.

    DiTs whose head size is not FLUX's 128 need a diffusers-style ``<name>.json`` beside them giving
    ``axes_dims_rope`` (as ``--dit-config`` on the command line).
    """
    dit_path = Path(dit_path)
    state_dict = strip_prefixes(load_state_dict(dit_path))
    check_dit_family(state_dict, dit_path.name, "e2p")
    if sniff_dit_format(state_dict) != "bfl":  # BFL files go through untouched, fp8 scales included
        state_dict = to_bfl(state_dict)[0]
    sidecar = dit_path.with_suffix(".json")
    architecture = infer_dit_architecture(state_dict, load_config_json(sidecar) if sidecar.is_file() else None)
    if architecture.axes_dims_rope is None:
        raise CheckpointError(f"{dit_path.name}: head size {architecture.head_dim} is not FLUX's; put a "
                              f"diffusers-style {sidecar.name} with 'axes_dims_rope' beside it")
    metadata = read_metadata(dit_path) if dit_path.suffix in SAFETENSORS_SUFFIXES else {}
    with weights_must_fit(dit_path.name):
        model = flux_model_from_state_dict(state_dict, architecture, model_options_for(weight_dtype), metadata)
    loras = [] if lora_path is None else [(lora_path, lora_strength)]
    for path, strength in loras:
        check_lora_family(path, "e2p")
        model = add_lora_patches(model, path, strength, architecture)
    variant = recorded_time_embedding(loras, metadata)
    if variant is not None:
        model.set_attachments(TIME_EMBEDDING_ATTACHMENT, variant)
    return model


def flux_model_from_state_dict(state_dict: dict[str, torch.Tensor], architecture: DiTArchitecture,
                               model_options: dict, metadata: dict[str, str] | None = None) -> ModelPatcher:
    """Build the ComfyUI Flux ModelPatcher for a BFL-named state dict.

    FLUX-sized DiTs take ComfyUI's own loader path unchanged. Its detection fixes 24 heads and RoPE axes
    (16, 56, 56) whatever the checkpoint says, so other sizes (research and test models) are built the same way with
    the checkpoint's own heads and axes put into the detected config.
    """
    if architecture.num_heads == FLUX_NUM_HEADS and architecture.axes_dims_rope == FLUX_AXES_DIMS_ROPE:
        model = comfy.sd.load_diffusion_model_state_dict(state_dict, model_options=model_options, metadata=metadata)
        if model is None:
            raise CheckpointError("ComfyUI could not detect this DiT as a Flux model")
        return model
    model_config = comfy.model_detection.model_config_from_unet(state_dict, "", metadata=metadata)
    if model_config is None:
        raise CheckpointError("ComfyUI could not detect this DiT as a Flux model")
    model_config.unet_config.update(num_heads=architecture.num_heads, axes_dim=list(architecture.axes_dims_rope))
    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    unet_dtype = model_options.get("dtype") or comfy.model_management.unet_dtype(
        model_params=comfy.utils.calculate_parameters(state_dict),
        supported_dtypes=model_config.supported_inference_dtypes, weight_dtype=comfy.utils.weight_dtype(state_dict))
    manual_cast_dtype = comfy.model_management.unet_manual_cast(unet_dtype, load_device,
                                                                model_config.supported_inference_dtypes)
    model_config.set_inference_dtype(unet_dtype, manual_cast_dtype)
    if model_options.get("fp8_optimizations", False):
        model_config.optimizations["fp8"] = True
    model = model_config.get_model(state_dict, "").to(offload_device)
    model.load_model_weights(state_dict, "")
    return ModelPatcher(model, load_device=load_device, offload_device=offload_device)


def add_lora_patches(model: ModelPatcher, lora_path: str | Path, strength: float,
                     architecture: DiTArchitecture) -> ModelPatcher:
    """A clone of ``model`` with the LoRA (kohya, BFL-PEFT, DiffSynth-PEFT or diffusers-PEFT) as weight patches."""
    lora_path = Path(lora_path)
    pairs = load_lora_file(lora_path, architecture.mlp_ratio)  # {BFL module: LoraPair}
    check_lora_fits(pairs, model.model.diffusion_model.state_dict(), lora_path.name)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patches = comfy.lora.load_lora(lora_to_kohya(pairs), key_map, log_missing=False)
    if len(patches) != len(pairs):
        raise CheckpointError(f"{lora_path.name}: ComfyUI accepted {len(patches)} of its {len(pairs)} LoRA layers")
    patched = model.clone()
    patched.add_patches(patches, strength)
    logger.info("Edit2Perceive: %s adds %d LoRA patches at strength %g", lora_path.name, len(patches), strength)
    return patched


class E2PModelLoader:
    DESCRIPTION = (
        "Loads an Edit2Perceive DiT as a native ComfyUI MODEL: a FLUX.1 Kontext file from diffusion_models (BFL "
        "naming, bf16 or fp8) plus the task LoRA from loras, or an Edit2Perceive full checkpoint "
        "(depth/normal/matting.safetensors, DiffSynth naming, converted on load). LoRAs in kohya, ComfyUI/BFL, "
        "DiffSynth or diffusers naming are applied as ComfyUI patches, so other LoRA, fp8 and memory features work."
    )
    CATEGORY = "Edit2Perceive/loaders"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The Edit2Perceive DiT (a ComfyUI Flux model with the task LoRA patched in).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (choices("diffusion_models"), {
                "tooltip": "DiT file in models/diffusion_models: FLUX.1 Kontext (BFL naming, bf16/fp8) or an "
                           "Edit2Perceive full checkpoint (DiffSynth naming). Entries marked 'download' are not on "
                           "disk yet: running the node fetches them from the Hugging Face hub into that folder "
                           "(FLUX.1 Kontext [dev] is gated: accept its licence and set HF_TOKEN)."}),
            "weight_dtype": (list(WEIGHT_DTYPES), {
                "default": "default",
                "tooltip": "Storage dtype of the DiT weights, as core 'Load Diffusion Model': fp8 halves the memory "
                           "at a small cost in accuracy."}),
            "lora_name": ([NO_LORA, *choices("loras")], {
                "default": NO_LORA,
                "tooltip": "The Edit2Perceive task LoRA in models/loras (kohya, ComfyUI, DiffSynth or diffusers "
                           "naming); 'none' for a full checkpoint. Entries marked 'download' are fetched from "
                           "Seq2Tri/Edit2Perceive into models/loras when the node runs."}),
            "lora_strength": ("FLOAT", {
                "default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                "tooltip": "LoRA strength; 1.0 is how the model was trained."}),
        }, "hidden": {"node_id": "UNIQUE_ID"}}

    @classmethod
    def VALIDATE_INPUTS(cls, model_name: str, lora_name: str):
        lora_problem = None if lora_name == NO_LORA else unknown_choice("loras", lora_name)
        return unknown_choice("diffusion_models", model_name) or lora_problem or True

    def load(self, model_name: str, weight_dtype: str, lora_name: str, lora_strength: float, node_id=None):
        dit_path = full_path("diffusion_models", model_name, node_id)
        lora_path = None if lora_name == NO_LORA else full_path("loras", lora_name, node_id)
        return (load_e2p_model(dit_path, weight_dtype, lora_path, lora_strength),)


class E2PVAELoader:
    DESCRIPTION = ("Loads the Flux VAE (ae.safetensors; for FE2E Step1X-Edit's step1x-edit-vae.safetensors) from "
                   "models/vae like core 'Load VAE'; when it is not on disk yet, running the node fetches it from the "
                   "Hugging Face hub (335 MB) into models/vae.")
    CATEGORY = "Edit2Perceive/loaders"
    FUNCTION = "load"
    RETURN_TYPES = ("VAE",)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("The Flux VAE, as core 'Load VAE' returns it.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae_name": (choices("vae", family=None), {
                "tooltip": "VAE file in models/vae. 'ae.safetensors (download ...)' is fetched when the node runs: "
                           "FLUX.1-schnell's copy (ungated) when the hub lists the same sha256 as Kontext's, else "
                           "Kontext's (gated: accept its licence and set HF_TOKEN). FE2E takes Step1X-Edit's "
                           "'step1x-edit-vae.safetensors' (fetched from stepfun-ai/Step1X-Edit)."}),
        }, "hidden": {"node_id": "UNIQUE_ID"}}

    @classmethod
    def VALIDATE_INPUTS(cls, vae_name: str):
        return unknown_choice("vae", vae_name, family=None) or True

    def load(self, vae_name: str, node_id=None):
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(full_path("vae", vae_name, node_id, family=None)))
        vae.throw_exception_if_invalid()
        return (vae,)
