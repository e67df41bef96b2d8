"""Recognising what a state dict is from its key names: which Flux DiT naming, which LoRA style, or what else.

Three DiT namings exist (E2P-SPEC §3.2): ``bfl`` (Black Forest Labs / ComfyUI single files), ``diffsynth`` (the
E2P full checkpoints) and ``diffusers`` (``FluxTransformer2DModel``). Sniffing only looks at distinctive key
markers; the converters in ``dit_keys`` then check every key exactly.
"""

from __future__ import annotations

import re
from typing import Literal

from ..errors import CheckpointError

DiTFormat = Literal["bfl", "diffsynth", "diffusers"]
LoraFormat = Literal["kohya", "diffsynth_peft", "diffusers_peft", "bfl_peft"]

# Longest first, so "model.diffusion_model." wins over "model.". "base_model.model." is what peft's
# get_peft_model_state_dict and fal-style Kontext LoRAs put in front of the module names.
KNOWN_PREFIXES = ("model.diffusion_model.", "base_model.model.", "diffusion_model.", "transformer.", "pipe.dit.",
                  "model.")

# Keys that only one DiT naming has (checked against module paths without the parameter name for LoRAs too).
_DIT_MARKERS: dict[str, re.Pattern[str]] = {
    "bfl": re.compile(
        r"^(double_blocks\.\d+\.|single_blocks\.\d+\.(linear[12]|modulation\.lin|norm\.(query|key)_norm)"
        r"|img_in\b|txt_in\b|time_in\.|vector_in\.|guidance_in\.|final_layer\.)"
    ),
    "diffsynth": re.compile(
        r"^(blocks\.\d+\.|single_blocks\.\d+\.(to_qkv_mlp|proj_out|norm\.linear|norm_[qk]_a)"
        r"|time_embedder\.|pooled_text_embedder\.|guidance_embedder\.|final_norm_out\.|final_proj_out\b)"
    ),
    "diffusers": re.compile(
        r"^(transformer_blocks\.\d+\.|single_transformer_blocks\.\d+\.|time_text_embed\.|norm_out\.|proj_out\b)"
    ),
}
_LORA_KEY = re.compile(r"(^lora_unet_|^lora_te\d?_|\.lora_(A|B|down|up)\b|\.alpha$|lora_magnitude_vector)")

# What a state dict that is not a Flux DiT may be instead; first match wins, so put specific patterns first.
_LOOKALIKES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("a LoRA (adapter weights), not a full model: load it as a LoRA", _LORA_KEY),
    ("an all-in-one checkpoint bundling a UNet/DiT with a VAE and text encoders: load the model part",
     re.compile(r"^(first_stage_model|cond_stage_model|conditioner|text_encoders)\.")),
    ("a VAE (autoencoder), not a Flux DiT",
     re.compile(r"^(encoder|decoder)\.(down|up|mid|down_blocks|up_blocks|mid_block|conv_in)\b|^(post_)?quant_conv\.")),
    ("a Stable Diffusion 1.x/2.x/SDXL UNet, not a Flux DiT",
     re.compile(r"^(input_blocks|middle_block|output_blocks)\.|^(down_blocks|up_blocks)\.\d+\.(attentions|resnets)\.|"
                r"^time_embedding\.|^label_emb\.")),
    ("a text encoder (T5 or CLIP), not a Flux DiT",
     re.compile(r"^(encoder\.block\.\d+\.layer|shared\.weight|text_model\.|text_projection|"
                r"encoder\.final_layer_norm|logit_scale)")),
)


def strip_prefixes(sd: dict) -> dict:
    """Remove one known wrapper prefix (``model.diffusion_model.``, ``pipe.dit.``, …) if every key carries it."""
    if not sd:
        return sd
    for prefix in KNOWN_PREFIXES:
        if all(key.startswith(prefix) for key in sd):
            return {key[len(prefix):]: value for key, value in sd.items()}
    return sd


def sniff_dit_format(sd: dict) -> DiTFormat:
    """Name the Flux DiT naming of ``sd`` ("bfl", "diffsynth" or "diffusers"), or raise ``CheckpointError``."""
    keys = list(strip_prefixes(sd))
    if not keys:
        raise CheckpointError("the checkpoint is empty (no tensors)")
    if any(_LORA_KEY.search(key) for key in keys):
        raise CheckpointError(f"this looks like {describe(keys)} (e.g. key {_first_match(keys, _LORA_KEY)!r})")
    hits = {fmt: [key for key in keys if marker.search(key)] for fmt, marker in _DIT_MARKERS.items()}
    found = [fmt for fmt, matched in hits.items() if matched]
    if len(found) == 1:
        return found[0]  # type: ignore[return-value]
    if len(found) > 1:
        examples = "; ".join(f"{fmt}: {', '.join(hits[fmt][:2])}" for fmt in found)
        raise CheckpointError(f"the checkpoint mixes Flux DiT key namings ({examples}); it was assembled incorrectly")
    raise CheckpointError(f"this is not a Flux DiT checkpoint: it looks like {describe(keys)} (e.g. keys {keys[:3]})")


def sniff_lora_format(sd: dict) -> LoraFormat:
    """Name the LoRA key style of ``sd``: kohya, diffsynth_peft, diffusers_peft or bfl_peft."""
    keys = list(strip_prefixes(sd))
    if not keys:
        raise CheckpointError("the LoRA file is empty (no tensors)")
    if any(key.startswith("lora_unet_") for key in keys):
        return "kohya"
    modules = [_peft_module(key) for key in keys if _LORA_KEY.search(key) and not key.startswith("lora_te")]
    if not modules:
        raise CheckpointError(
            f"no LoRA weights found: this looks like {describe(keys)} (e.g. keys {keys[:3]}); expected kohya "
            f"'lora_unet_*.lora_down.weight' or PEFT '*.lora_A.weight' keys"
        )
    found = {fmt: [m for m in modules if marker.search(m)] for fmt, marker in _DIT_MARKERS.items()}
    found = {fmt: matched for fmt, matched in found.items() if matched}
    if len(found) == 1:
        return {"bfl": "bfl_peft", "diffsynth": "diffsynth_peft", "diffusers": "diffusers_peft"}[next(iter(found))]
    if len(found) > 1:
        examples = "; ".join(f"{fmt}: {', '.join(m[:2])}" for fmt, m in found.items())
        raise CheckpointError(f"the LoRA mixes Flux DiT module namings ({examples})")
    raise CheckpointError(
        f"unknown LoRA key style (e.g. {keys[:3]}): the module names match no Flux DiT naming (BFL, DiffSynth or "
        f"diffusers); is it a LoRA for another model (SD, SDXL, a text encoder)?"
    )


def describe(keys: list[str]) -> str:
    """Say in words what a key set looks like, for error messages."""
    for what, pattern in _LOOKALIKES:
        if any(pattern.search(key) for key in keys):
            return what
    return "an unknown layout"


def _peft_module(key: str) -> str:
    """``a.b.lora_A.default.weight`` / ``a.b.lora_down.weight`` / ``a.b.alpha`` -> ``a.b``."""
    return re.sub(r"\.(lora_(A|B|down|up)(\.[^.]+)?\.weight|lora_B(\.[^.]+)?\.bias|alpha|lora_magnitude_vector.*)$",
                  "", key)


def _first_match(keys: list[str], pattern: re.Pattern[str]) -> str:
    return next(key for key in keys if pattern.search(key))
