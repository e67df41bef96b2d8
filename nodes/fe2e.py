"""The FE2E nodes: loader -> conditioning (cached empty prompt + the checkpoint's connector) -> ONE perceive call that
returns depth AND normals, each an ``E2P_PREDICTION`` the existing depth and normal output nodes take unchanged.

They are thin schemas over ``e2p_core.fe2e.perceive_fe2e`` (the algorithm, written once) and the ComfyUI backend of
``comfy_fe2e`` (Step1X-Edit on ComfyUI's own Flux class, the LoRA as patches, a posterior-sampling VAE codec).

The connector turns the prompt cache AND the timestep into the DiT's text at every call, so the CONDITIONING cannot
hold finished text tokens: it carries the cached embedding [1,L,D] with its mask and the connector module.
"""

import math

import comfy.model_management
import comfy.utils
import folder_paths
import torch
from comfy.model_patcher import ModelPatcher

from ..e2p_core.connector import PromptCache, Qwen2Connector, load_prompt_cache
from ..e2p_core.errors import InputError
from ..e2p_core.fe2e import DEFAULT_SEED, Resolution, perceive_fe2e
from ..e2p_core.schedule import MAX_STEPS
from .comfy_fe2e import ComfyPosteriorCodec, ComfyStep1XDenoiser, load_fe2e_model
from .conditioning import PROMPTS_FOLDER
from .loader import NO_LORA, WEIGHT_DTYPES
from .model_files import choices, full_path, unknown_choice
from .perceive import DEFAULT_CHUNK, MAX_SEED, RESIZE_MODES, _check_images
from .prediction import E2P_PREDICTION, Prediction

FE2E_CONNECTOR = "FE2E_CONNECTOR"  # an e2p_core.connector.Qwen2Connector
CONNECTOR_KEY = "fe2e_connector"  # CONDITIONING entries of an FE2E conditioning
MASK_KEY = "fe2e_prompt_mask"
PROMPT_CACHE_NAME = "no_info.npz"  # FE2E's latent/no_info.npz
FE2E_LORA_NAME = "LDRN.safetensors"
RESOLUTION_MODES = ("buckets", "longer_side", "native")
FAMILY = "fe2e"


class FE2EModelLoader:
    DESCRIPTION = (
        "Loads FE2E: the Step1X-Edit DiT (step1x-edit-i1258.safetensors, or its FP8 variant, from diffusion_models) "
        "as a native ComfyUI MODEL on ComfyUI's own Flux class, with FE2E's LoRA (LDRN.safetensors from loras) as "
        "patches, and the checkpoint's Qwen2 connector for 'FE2E Conditioning'."
    )
    CATEGORY = "Edit2Perceive/FE2E"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", FE2E_CONNECTOR)
    RETURN_NAMES = ("model", "connector")
    OUTPUT_TOOLTIPS = ("The Step1X-Edit DiT with FE2E's LoRA patched in (a ComfyUI Flux model without guidance).",
                       "Step1X-Edit's Qwen2 connector from the same checkpoint: feed it to 'FE2E Conditioning'.")

    @classmethod
    def INPUT_TYPES(cls):
        loras = [NO_LORA, *choices("loras", family=FAMILY)]
        return {"required": {
            "model_name": (choices("diffusion_models", family=FAMILY), {
                "tooltip": "Step1X-Edit checkpoint in models/diffusion_models (DiT in BFL naming + connector.*, bf16 "
                           "or FP8). Entries marked 'download' are fetched from the Hugging Face hub into that "
                           "folder when the node runs (25 GB). An Edit2Perceive / FLUX file is refused."}),
            "weight_dtype": (list(WEIGHT_DTYPES), {
                "default": "default",
                "tooltip": "Storage dtype of the DiT weights, as core 'Load Diffusion Model': fp8 halves the memory "
                           "at a small cost in accuracy."}),
            "lora_name": (loras, {
                "default": next((name for name in loras if name.startswith(FE2E_LORA_NAME)), NO_LORA),
                "tooltip": "FE2E's LoRA in models/loras (exander/FE2E LDRN.safetensors, kohya naming; fetched when "
                           "marked 'download'). 'none' runs plain Step1X-Edit, which does not predict geometry. An "
                           "Edit2Perceive LoRA is refused."}),
            "lora_strength": ("FLOAT", {
                "default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                "tooltip": "LoRA strength; 1.0 is how FE2E was trained (its alpha/rank scale 0.5 is in the file)."}),
        }, "hidden": {"node_id": "UNIQUE_ID"}}

    @classmethod
    def VALIDATE_INPUTS(cls, model_name: str, lora_name: str):
        lora_problem = None if lora_name == NO_LORA else unknown_choice("loras", lora_name, FAMILY)
        return unknown_choice("diffusion_models", model_name, FAMILY) or lora_problem or True

    def load(self, model_name: str, weight_dtype: str, lora_name: str, lora_strength: float, node_id=None):
        dit_path = full_path("diffusion_models", model_name, node_id, FAMILY)
        lora_path = None if lora_name == NO_LORA else full_path("loras", lora_name, node_id, FAMILY)
        return load_fe2e_model(dit_path, lora_path, lora_strength, weight_dtype)


def prompt_cache_choices() -> list[str]:
    files = [name for name in folder_paths.get_filename_list(PROMPTS_FOLDER) if name.endswith(".npz")]
    return files or [PROMPT_CACHE_NAME]  # the expected name, so a saved workflow validates before the file exists


def to_fe2e_conditioning(prompt: PromptCache, connector: Qwen2Connector) -> list:
    """A ComfyUI CONDITIONING ([[embeds [1,L,D], {...}]]) carrying the prompt cache and the connector."""
    if prompt.embeds.shape[-1] != connector.arch.in_channels:
        raise InputError(f"the prompt cache holds {prompt.embeds.shape[-1]}-wide embeddings; this checkpoint's "
                         f"connector takes {connector.arch.in_channels} (Qwen2.5-VL-7B's 3584 for Step1X-Edit)")
    return [[prompt.embeds, {MASK_KEY: prompt.mask, CONNECTOR_KEY: connector}]]


def fe2e_conditioning_parts(conditioning: list) -> tuple[PromptCache, Qwen2Connector]:
    """(prompt cache, connector) from a CONDITIONING made by :class:`FE2EConditioning`."""
    extras = conditioning[0][1] if conditioning and len(conditioning[0]) == 2 else {}
    if not isinstance(extras.get(CONNECTOR_KEY), Qwen2Connector) or extras.get(MASK_KEY) is None:
        raise InputError("this CONDITIONING is not FE2E's; make it with 'FE2E Conditioning' (an Edit2Perceive task "
                         "conditioning belongs to 'Edit2Perceive Perceive')")
    return PromptCache(conditioning[0][0], extras[MASK_KEY]), extras[CONNECTOR_KEY]


class FE2EConditioning:
    DESCRIPTION = (
        "FE2E's text conditioning: the cached Qwen2.5-VL embedding of the empty prompt (no_info.npz from the FE2E "
        "repository, latent/no_info.npz, put in models/e2p_prompts) with the checkpoint's connector, which turns it "
        "into the DiT's text at every step. Qwen never runs."
    )
    CATEGORY = "Edit2Perceive/FE2E"
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("The prompt cache and the connector, for 'FE2E Perceive'.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "connector": (FE2E_CONNECTOR, {"tooltip": "The connector output of 'FE2E Model Loader'."}),
                "prompt_cache": (prompt_cache_choices(), {
                    "default": PROMPT_CACHE_NAME,
                    "tooltip": f"The empty-prompt cache in models/{PROMPTS_FOLDER}: FE2E's latent/no_info.npz "
                               "('embeds' [L,3584] float32, 'masks' [L]), downloaded from the FE2E GitHub "
                               "repository."}),
            },
            "optional": {
                "prompt_cache_path": ("STRING", {
                    "default": "",
                    "tooltip": "A path to no_info.npz anywhere on disk instead of the picker (leave empty to use "
                               "the picker)."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, prompt_cache: str):
        return True  # a missing file is reported when the node runs, with where to get it

    def encode(self, connector, prompt_cache, prompt_cache_path=""):
        path = prompt_cache_path.strip() or folder_paths.get_full_path(PROMPTS_FOLDER, prompt_cache)
        if path is None:
            folders = folder_paths.get_folder_paths(PROMPTS_FOLDER)
            raise InputError(f"prompt cache {prompt_cache!r} is not in {folders}; download latent/no_info.npz from "
                             f"the FE2E GitHub repository (AMAP-ML/FE2E) into models/{PROMPTS_FOLDER}, or give its "
                             f"path")
        return (to_fe2e_conditioning(load_prompt_cache(path), connector),)


def fe2e_resolution(mode: str, resolution: int) -> Resolution:
    if mode not in RESOLUTION_MODES:
        raise InputError(f"resolution_mode must be one of {RESOLUTION_MODES}, got {mode!r}")
    return {"buckets": "buckets", "native": "native"}.get(mode, resolution)


def run_fe2e(model: ModelPatcher, vae, conditioning: list, images: torch.Tensor, *, steps: int = 1,
             seed: int = DEFAULT_SEED, resolution_mode: str = "buckets", resolution: int = 768,
             resize_mode: str = "aligned", chunk_size: int = DEFAULT_CHUNK) -> tuple[Prediction, Prediction]:
    """Depth and normals of every frame of ``images`` (IMAGE [B,H,W,C]) in chunks of ``chunk_size``.

    The classifier-free rows of the reference are identical with the empty prompt, so one row runs
    (``cfg_rows=1``): half the DiT work, equal to two rows up to rounding.
    """
    prompt, connector = fe2e_conditioning_parts(conditioning)
    frames = _check_images(images)[..., :3]
    if chunk_size < 1:
        raise InputError(f"chunk_size must be at least 1, got {chunk_size}")
    processing = fe2e_resolution(resolution_mode, resolution)
    denoiser = ComfyStep1XDenoiser(model, connector)
    codec = ComfyPosteriorCodec(vae, denoiser.device)
    chunks = math.ceil(len(frames) / chunk_size)
    progress = comfy.utils.ProgressBar(chunks * steps)
    depths, normals = [], []
    for index in range(chunks):
        chunk = frames[index * chunk_size:(index + 1) * chunk_size]

        def on_step(step: int, _steps: int, done: int = index * steps) -> None:
            comfy.model_management.throw_exception_if_processing_interrupted()
            progress.update_absolute(done + step)

        result = perceive_fe2e(denoiser, codec, chunk, prompt, steps=steps, seed=seed, resize=resize_mode,
                               resolution=processing, cfg_rows=1, on_step=on_step)
        depths.append(result.depth.to(comfy.model_management.intermediate_device()))
        normals.append(result.normal.to(comfy.model_management.intermediate_device()))
        progress.update_absolute((index + 1) * steps)
    return Prediction("depth", torch.cat(depths), images), Prediction("normal", torch.cat(normals), images)


class FE2EPerceive:
    DESCRIPTION = (
        "Runs FE2E: one DiT call predicts depth AND surface normals for every frame, at exactly the input size. Feed "
        "'depth' to 'Edit2Perceive Depth Output' and 'normal' to 'Edit2Perceive Normal Output'."
    )
    CATEGORY = "Edit2Perceive/FE2E"
    FUNCTION = "perceive"
    RETURN_TYPES = (E2P_PREDICTION, E2P_PREDICTION)
    RETURN_NAMES = ("depth", "normal")
    OUTPUT_TOOLTIPS = ("Depth in 0..1, near = 0 (affine-invariant), for 'Edit2Perceive Depth Output'.",
                       "Unit normals (+x left, +y up, +z toward the camera), for 'Edit2Perceive Normal Output'.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The FE2E model (model output of 'FE2E Model Loader')."}),
                "vae": ("VAE", {"tooltip": "Step1X-Edit's VAE (the Flux autoencoder, core 'Load VAE' or "
                                           "'Edit2Perceive VAE Loader')."}),
                "conditioning": ("CONDITIONING", {"tooltip": "From 'FE2E Conditioning'."}),
                "image": ("IMAGE", {"tooltip": "Image or video frames [B,H,W,3]; every frame gets the same noise."}),
                "steps": ("INT", {"default": 1, "min": 1, "max": min(MAX_STEPS, 50),
                                  "tooltip": "Sampling steps; 1 is FE2E's setting (one DiT call from a zero latent). "
                                             "More steps start from seeded noise on FE2E's shifted schedule."}),
                "seed": ("INT", {"default": DEFAULT_SEED, "min": 0, "max": MAX_SEED, "control_after_generate": False,
                                 "tooltip": "Seed of the VAE posterior sample (and of the start noise for several "
                                            "steps); 1234 as FE2E's evaluation. Kept between runs."}),
                "resolution_mode": (list(RESOLUTION_MODES), {
                    "default": "buckets",
                    "tooltip": "Processing size: 'buckets' = FE2E's table (up to 1024x768 -> 1024x768, up to "
                               "1280x960 -> 1216x352, else 864x576); 'longer_side' = the resolution below; "
                               "'native' = the image's own size. The output always has the input's exact size."}),
                "resolution": ("INT", {"default": 768, "min": 64, "max": 4096, "step": 16,
                                       "tooltip": "Longer side in pixels, used by 'longer_side' only."}),
                "resize_mode": (list(RESIZE_MODES), {
                    "default": "aligned",
                    "tooltip": "For 'longer_side' and 'native': 'aligned' keeps the aspect ratio and pads to "
                               "multiples of 16; 'reference' squashes to a square."}),
                "chunk_size": ("INT", {"default": DEFAULT_CHUNK, "min": 1, "max": 256,
                                       "tooltip": "Frames per model call; lower it if memory runs out on videos."}),
            },
        }

    def perceive(self, model, vae, conditioning, image, steps, seed, resolution_mode, resolution, resize_mode,
                 chunk_size):
        return run_fe2e(model, vae, conditioning, image, steps=steps, seed=seed, resolution_mode=resolution_mode,
                        resolution=resolution, resize_mode=resize_mode, chunk_size=chunk_size)
