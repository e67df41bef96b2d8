"""Checkpoint handling for Edit2Perceive: file I/O, format sniffing, DiT/VAE key conversion, architecture
inference and LoRAs. BFL naming is the hub every DiT format converts to and from. Pure torch + safetensors.
"""

from .arch import DiTArchitecture, VAEArchitecture, infer_dit_architecture, infer_vae_architecture
from .dit_keys import (
    bfl_to_diffsynth,
    bfl_to_diffusers,
    convert_dit,
    diffsynth_to_bfl,
    diffusers_to_bfl,
    to_bfl,
)
from .io import (
    dequantize,
    load_config_json,
    load_diffusers_folder,
    load_state_dict,
    read_metadata,
    save_safetensors_atomic,
    stage_file,
    weights_must_fit,
    write_atomically,
)
from .lora import (
    LoraPair,
    check_lora_fits,
    load_lora,
    load_lora_file,
    lora_to_diffsynth_peft,
    lora_to_diffusers_peft,
    lora_to_kohya,
    merge_lora,
    merge_lora_in_place,
)
from .sniff import sniff_dit_format, sniff_lora_format, strip_prefixes
from .vae_keys import sniff_vae_format, vae_bfl_to_diffusers, vae_diffusers_to_bfl, vae_to_diffusers

__all__ = [
    "DiTArchitecture", "LoraPair", "VAEArchitecture", "bfl_to_diffsynth", "bfl_to_diffusers", "check_lora_fits",
    "convert_dit",
    "dequantize", "diffsynth_to_bfl", "diffusers_to_bfl", "infer_dit_architecture", "infer_vae_architecture",
    "load_config_json", "load_diffusers_folder", "load_lora", "load_lora_file", "load_state_dict",
    "lora_to_diffsynth_peft", "lora_to_diffusers_peft", "lora_to_kohya", "merge_lora", "merge_lora_in_place",
    "read_metadata",
    "save_safetensors_atomic", "sniff_dit_format", "sniff_lora_format", "sniff_vae_format", "stage_file",
    "strip_prefixes", "weights_must_fit", "write_atomically",
    "to_bfl", "vae_bfl_to_diffusers", "vae_diffusers_to_bfl", "vae_to_diffusers",
]
