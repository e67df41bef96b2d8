"""The perceive node: MODEL + VAE + CONDITIONING + IMAGE (+ point prompt) -> an Edit2Perceive prediction.

It runs ``e2p_core.pipeline.perceive`` (the algorithm, written once) with the ComfyUI backend, chunk by chunk: an
IMAGE batch is a video, every frame gets the same seeded noise, and frames come back in order at their exact size.
"""

import functools
import math
from typing import get_args

import comfy.model_management
import comfy.utils
import torch
from comfy.model_patcher import ModelPatcher

from ..e2p_core.errors import InputError
from ..e2p_core.images import ResizeMode
from ..e2p_core.pipeline import EncodedImage, perceive
from ..e2p_core.schedule import MAX_STEPS
from ..e2p_core.tiling import auto_tiles, perceive_tiled, plan_tiles
from ..e2p_core.time_embedding import AUTO, TIME_EMBEDDING_CHOICES, resolve_time_embedding
from .comfy_backend import ComfyCodec, ComfyDenoiser
from .conditioning import conditioning_to_prompt
from .loader import TIME_EMBEDDING_ATTACHMENT
from .prediction import E2P_ENCODED_IMAGE, E2P_POINT_PROMPT, E2P_PREDICTION, PointPromptInput, Prediction

RESIZE_MODES = get_args(ResizeMode)  # ("aligned", "reference")
NATIVE_RESOLUTION = 0  # the resolution input's value for "process at the image's own size"
DEFAULT_CHUNK = 4
MAX_SEED = 0xFFFFFFFFFFFFFFFF
AUTO_TILES = -1  # the tiles input's value for "as many as the image needs at the processing size"


def run_perceive(
    model: ModelPatcher,
    vae,
    conditioning: list,
    images: torch.Tensor,
    *,
    steps: int = 1,
    seed: int = 42,
    resize_mode: str = "aligned",
    resolution: int = 768,
    chunk_size: int = DEFAULT_CHUNK,
    time_embedding: str = AUTO,
    point_prompt: PointPromptInput | None = None,
    point_map: torch.Tensor | None = None,
    tiles: int = 0,
    encoded_image: EncodedImage | None = None,
) -> Prediction:
    """Predict every frame of ``images`` (IMAGE [B,H,W,C]) in chunks of ``chunk_size``; see ``e2p_core.pipeline``.
    ``tiles`` > 0 (or ``AUTO_TILES``) runs each frame as a global pass plus tiles (``e2p_core.tiling``);
    ``encoded_image`` (the encode node's output for these frames) replaces the RGB encode."""
    task, prompt, guidance = conditioning_to_prompt(conditioning)
    frames = _check_images(images)
    if chunk_size < 1:
        raise InputError(f"chunk_size must be at least 1, got {chunk_size}")
    if point_prompt is not None and tuple(point_prompt.image_hw) != tuple(frames.shape[1:3]):
        height, width = point_prompt.image_hw
        raise InputError(f"the point prompt was made on a {width}x{height} image, the image to perceive is "
                         f"{frames.shape[2]}x{frames.shape[1]}; connect the same image to both nodes")
    time_embedding = resolve_time_embedding(time_embedding, model.get_attachment(TIME_EMBEDDING_ATTACHMENT))
    denoiser = ComfyDenoiser(model, time_embedding)
    codec = ComfyCodec(vae, denoiser.dtype, denoiser.device)
    prompt = prompt.to(denoiser.device, denoiser.dtype)
    maps = _check_point_map(point_map, len(frames))
    if encoded_image is not None and encoded_image.latent.shape[0] != len(frames):
        raise InputError(f"encoded_image holds {encoded_image.latent.shape[0]} frames, the image {len(frames)}; "
                         f"connect the same image to the encode node")
    if tiles != 0:
        if encoded_image is not None:
            raise InputError("tiles encode every tile themselves; disconnect encoded_image or set tiles to 0")
        run_frame = functools.partial(perceive, denoiser, codec, task=task, prompt=prompt, steps=steps, seed=seed,
                                      guidance=guidance, resize=resize_mode, resolution=resolution)
        output = _run_tiled(run_frame, frames, task, tiles, resolution,
                            None if point_prompt is None else point_prompt.prompt, maps)
        return Prediction(task, output, images)

    chunks = math.ceil(len(frames) / chunk_size)
    progress = comfy.utils.ProgressBar(chunks * steps)
    outputs = []
    for index in range(chunks):
        start = index * chunk_size
        chunk = frames[start:start + chunk_size]

        def on_step(step: int, _steps: int, done: int = index * steps) -> None:
            comfy.model_management.throw_exception_if_processing_interrupted()
            progress.update_absolute(done + step)

        result = perceive(
            denoiser, codec, chunk, task, prompt,
            points=None if point_prompt is None else point_prompt.prompt,
            point_map=_chunk_of(maps, start, chunk_size),
            steps=steps, seed=seed, guidance=guidance, resize=resize_mode,
            resolution="native" if resolution == NATIVE_RESOLUTION else resolution, on_step=on_step,
            encoded=None if encoded_image is None else EncodedImage(encoded_image.latent[start:start + chunk_size],
                                                                    encoded_image.geometry),
        )
        outputs.append(result.output.to(comfy.model_management.intermediate_device()))
        progress.update_absolute((index + 1) * steps)
    return Prediction(task, torch.cat(outputs), images)


def _run_tiled(run_frame, frames: torch.Tensor, task: str, tiles: int, resolution: int, points, maps
               ) -> torch.Tensor:
    """Every frame as a global pass plus overlapping tiles at the processing size, merged (one frame at a time)."""
    if resolution == NATIVE_RESOLUTION:
        raise InputError("tiles need a processing resolution (the tiles are cut at it); set resolution above 0")
    image_hw = tuple(frames.shape[1:3])
    count = auto_tiles(image_hw, resolution) if tiles == AUTO_TILES else tiles
    calls = 1 + len(plan_tiles(image_hw, count))
    progress = comfy.utils.ProgressBar(len(frames) * calls)
    outputs = []
    for index, frame in enumerate(frames[..., :3].numpy()):
        def on_tile(tile: int, _calls: int, done: int = index * calls) -> None:
            comfy.model_management.throw_exception_if_processing_interrupted()
            progress.update_absolute(done + tile)

        def perceiver(image, tile_points, tile_map):
            return run_frame(images=image, points=tile_points, point_map=tile_map).output[0]

        frame_map = None if maps is None else maps[0 if len(maps) == 1 else index].numpy()
        merged = perceive_tiled(perceiver, frame, task, count, points=points, point_map=frame_map, on_tile=on_tile)
        outputs.append(merged[None].to(comfy.model_management.intermediate_device()))
    return torch.cat(outputs)


def _chunk_of(maps: torch.Tensor | None, start: int, size: int) -> torch.Tensor | None:
    """The point maps of one chunk: per-frame maps are sliced, a single map serves every frame."""
    return maps if maps is None or len(maps) == 1 else maps[start:start + size]


def _check_images(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] not in (3, 4) \
            or images.shape[0] == 0:
        shape = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise InputError(f"image has shape {shape}; expected a ComfyUI IMAGE [B,H,W,3] with values in 0..1")
    return images.detach().cpu()


def _check_point_map(point_map: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    if point_map is None:
        return None
    maps = point_map if point_map.ndim == 3 else point_map[None]
    if maps.ndim != 3 or maps.shape[0] not in (1, batch):
        raise InputError(f"point_map has shape {list(point_map.shape)}; expected a MASK [1,H,W] or [{batch},H,W]")
    return maps.detach().cpu().float()


# Inputs shared with the all-in-one nodes.
RESOLUTION_INPUT = ("INT", {
    "default": 768, "min": NATIVE_RESOLUTION, "max": 4096, "step": 16,
    "tooltip": "Processing size of the longer side in pixels (768 = training); 0 = the image's own size. The output "
               "always has the input's exact size."})


ENCODED_IMAGE_INPUT = (E2P_ENCODED_IMAGE, {
    "tooltip": "The same image encoded once by 'Edit2Perceive Encode Image' (same resolution), shared with other "
               "nodes: skips this node's VAE encode."})


class E2PPerceive:
    DESCRIPTION = (
        "Runs Edit2Perceive: the DiT predicts depth, normals or matting alpha (the task of the conditioning) for every "
        "frame of the image batch in one fixed-seed step, at exactly the input size. Feed the prediction to the "
        "depth, normal or matte output node."
    )
    CATEGORY = "Edit2Perceive"
    FUNCTION = "perceive"
    RETURN_TYPES = (E2P_PREDICTION,)
    RETURN_NAMES = ("prediction",)
    OUTPUT_TOOLTIPS = ("The raw prediction in the reference conventions (depth near = 0, E2P-frame normals, alpha).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The Edit2Perceive DiT (Edit2Perceive Model Loader, or a FLUX.1 Kontext "
                                               "model with the task LoRA)."}),
                "vae": ("VAE", {"tooltip": "The Flux VAE (ae.safetensors, core 'Load VAE')."}),
                "conditioning": ("CONDITIONING", {"tooltip": "From 'Edit2Perceive Task Conditioning'; it sets the "
                                                             "task."}),
                "image": ("IMAGE", {"tooltip": "Image or video frames [B,H,W,3]; every frame is predicted with the "
                                               "same noise."}),
                "steps": ("INT", {"default": 1, "min": 1, "max": min(MAX_STEPS, 50),
                                  "tooltip": "Sampling steps; 1 is the paper's setting (one DiT call)."}),
                # No "control after generate" widget: a perceiver should give the same answer on every run.
                "seed": ("INT", {"default": 42, "min": 0, "max": MAX_SEED, "control_after_generate": False,
                                 "tooltip": "Seed of the initial noise (42 as the reference), shared by all frames "
                                            "and kept between runs."}),
                "resize_mode": (list(RESIZE_MODES), {
                    "default": "aligned",
                    "tooltip": "'aligned': keep the aspect ratio, pad to multiples of 16; 'reference': the official "
                               "square squash."}),
                "resolution": RESOLUTION_INPUT,
                "chunk_size": ("INT", {"default": DEFAULT_CHUNK, "min": 1, "max": 256,
                                       "tooltip": "Frames per model call; lower it if memory runs out on videos."}),
                "time_embedding": (list(TIME_EMBEDDING_CHOICES), {
                    "default": AUTO,
                    "tooltip": "Timestep-embedding variant: 'auto' = what the model file or the pack's loader's "
                               "LoRA records, else 'bf16' (bf16-rounded frequencies, how every released "
                               "Edit2Perceive weight was trained); 'reference' = rounded to the compute dtype as "
                               "the official code; 'exact' = ComfyUI/BFL float32 frequencies."}),
            },
            "optional": {
                "point_prompt": (E2P_POINT_PROMPT, {"tooltip": "Matting: the clicks from 'Edit2Perceive Point "
                                                               "Prompt'."}),
                "point_map": ("MASK", {"tooltip": "Matting: a soft point map in 0..1 at the image size instead of "
                                                  "clicks (1 = foreground point)."}),
                "encoded_image": ENCODED_IMAGE_INPUT,
                "tiles": ("INT", {
                    "default": 0, "min": AUTO_TILES, "max": 16,
                    "tooltip": "High-resolution tiling: 0 = off (one pass at the processing size); N = a global pass "
                               "plus N overlapping tiles along the longer side (as many as needed along the other) "
                               "cut from the full-size image, merged without seams; -1 = auto (tiles of about the "
                               "processing size). DiT calls per frame: steps x (1 + rows x columns), e.g. 1 + 3x2 = "
                               "7 for N = 3 on a 16:9 image."}),
            },
        }

    def perceive(self, model, vae, conditioning, image, steps, seed, resize_mode, resolution, chunk_size,
                 time_embedding, point_prompt=None, point_map=None, tiles=0, encoded_image=None):
        return (run_perceive(model, vae, conditioning, image, steps=steps, seed=seed, resize_mode=resize_mode,
                             resolution=resolution, chunk_size=chunk_size, time_embedding=time_embedding,
                             point_prompt=point_prompt, point_map=point_map, tiles=tiles,
                             encoded_image=encoded_image),)
