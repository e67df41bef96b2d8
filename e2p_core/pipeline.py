"""Edit2Perceive inference: one image (+ a point prompt for matting) -> depth, normals or alpha.

The algorithm of the official code (E2P-SPEC §1.10), stage by stage:

1. Preprocess: resize to the processing size (``aligned``: keep aspect and pad; ``reference``: the official square
   squash) and map to [-1,1]. Matting adds a soft point map, encoded as ``map*2-1`` on 3 channels.
2. Encode every context image with the VAE (posterior mean, shift, scale) and pack it into 2x2 tokens; every
   context image gets RoPE ids (1, row, col), the target (0, row, col).
3. Draw the initial latent: fixed-seed Gaussian noise in float32, cast to the model dtype.
4. Sample: 1 step at t = 1000 with the reference's -0.99107 factor, or N Euler steps on the shift-3 grid.
5. Decode, postprocess in the decoder's dtype (clip and map to [0,1]; unit-normalise normals), and bring the result
   back to exactly the input H x W.

Outputs are in the reference conventions (``e2p_core.conventions`` converts them): depth is affine-invariant,
normalised to [0,1] with near = 0 (``depth_affine01``); normals are unit vectors in the training frame (+x left,
+y up, +z toward the camera, ``normals_e2p``); alpha is in [0,1] with 1 = foreground.
"""

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from .backends.base import Denoiser, LatentCodec
from .errors import InputError
from .images import Geometry, pad_map, plan_geometry, prepare_image, prepare_map, resize_map, restore
from .points import build_point_map, encode_point_map, scale_coords
from .prompts import PromptEmbeddings
from .schedule import LATENT_CHANNELS, euler_step, initial_noise, make_schedule
from .tasks import Task, get_task
from .tokens import pack_context, pack_latents, unpack_tokens

logger = logging.getLogger(__name__)

NORMAL_EPS = 1e-8  # the reference's x / (||x|| + 1e-8)


@dataclass(frozen=True)
class PointPrompt:
    """Where the foreground is, for matting; rasterised at the processing size, as the reference does.

    * ``app``: disks of ``radius_px`` around the clicks, 10 seed-42 points sampled inside them, each a Gaussian of
      ``sigma_px``, max-combined (the official app);
    * ``clicks``: Gaussians exactly at the clicks (intuitive, but not what was trained);
    * ``mask``: 10 seed-42 points sampled where ``mask`` > 0.8 (how the training prompts were made).

    ``None`` sizes are the reference's 30 px (sigma) and 100 px (radius) at 768, scaled to the processing size.
    """

    points_px: np.ndarray | None = None  # [N,2] (x, y) in input-image pixels; app and clicks modes
    mask: np.ndarray | None = None  # [H,W] in [0,1] at the input size; mask mode
    mode: Literal["app", "clicks", "mask"] = "app"
    sigma_px: float | None = None
    radius_px: float | None = None


@dataclass
class Perception:
    """Everything one run produced; all batch-first."""

    output: torch.Tensor | None  # float32 [B,C,H,W] at the input size: depth_affine01 / normals_e2p / alpha
    # (None when perceive was called with restore_output=False)
    postprocessed: torch.Tensor  # float32 [B,C,Hp,Wp]: the same at the processing size (the reference's output)
    decoded: torch.Tensor  # model dtype [B,3,Hp,Wp]: raw VAE output at the processing size
    latent: torch.Tensor  # float32 [B,16,h,w]: final latent, before the cast for decoding
    velocity: torch.Tensor  # model dtype [B,16,h,w]: first-step DiT velocity of the target
    point_map: torch.Tensor | None  # float32 [B,Hp,Wp] in [0,1]: the soft point map fed to the model (matting)
    geometry: Geometry


@dataclass(frozen=True)
class EncodedImage:
    """The RGB context latent of a batch: the same for depth, normals and matting (one VAE, one preprocessing), so
    one encode can feed every task (``perceive(..., encoded=...)``)."""

    latent: torch.Tensor  # codec dtype [B,16,h,w]: posterior mean after shift and scale
    geometry: Geometry


@torch.no_grad()
def encode_image(codec: LatentCodec, images, *, resize: Literal["aligned", "reference"] = "aligned",
                 resolution: int | Literal["native"] = 768) -> EncodedImage:
    """Stages 1-2 of :func:`perceive` for the RGB context: preprocess and VAE-encode a batch of same-size images."""
    frames = as_frames(images)
    geometry = plan_geometry(frames[0].shape[:2], resize, resolution)
    rgb = torch.stack([prepare_image(frame, geometry) for frame in frames])  # [B,3,Hp,Wp]
    return EncodedImage(codec.encode(rgb.to(codec.device, codec.dtype)), geometry)  # [B,16,h,w]


@torch.no_grad()  # inference only: training differentiates through its own objective, not through sampling
def perceive(
    denoiser: Denoiser,
    codec: LatentCodec,
    images: Sequence[np.ndarray] | np.ndarray | torch.Tensor,
    task: str,
    prompt: PromptEmbeddings,
    *,
    points: PointPrompt | None = None,
    point_map: np.ndarray | torch.Tensor | None = None,
    steps: int = 1,
    seed: int = 42,
    noise: torch.Tensor | None = None,
    guidance: float = 1.0,
    resize: Literal["aligned", "reference"] = "aligned",
    resolution: int | Literal["native"] = 768,
    on_step: Callable[[int, int], None] | None = None,
    restore_output: bool = True,
    encoded: EncodedImage | None = None,
) -> Perception:
    """Run Edit2Perceive on a batch of same-size images ([B,H,W,3] uint8 or float in [0,1], or one [H,W,3]).

    ``point_map`` is a soft map in [0,1] at the input size ([H,W] or [B,H,W]); ``points`` builds one instead.
    ``noise`` ([1 or B,16,h,w] float32) replaces the seeded noise. ``on_step(i, steps)`` runs before every DiT
    call (progress bars, cancellation). ``restore_output=False`` skips the resize back to the input size (``output``
    is None) for callers that take ``postprocessed`` to their own grid, as the evaluation does. ``encoded`` (from
    :func:`encode_image` on the same images, resize and resolution) skips the RGB encode: one encode, many tasks.
    """
    spec = get_task(task)
    frames = as_frames(images)
    geometry = plan_geometry(frames[0].shape[:2], resize, resolution)
    dtype, device = denoiser.dtype, denoiser.device

    # 1-2. The Kontext context images in [-1,1] at the processing size, encoded: the RGB (the same for every task,
    # so it may come encoded already), then (matting) the point map.
    if encoded is None:
        encoded = encode_image(codec, frames, resize=resize, resolution=resolution)
    elif encoded.geometry != geometry or encoded.latent.shape[0] != len(frames):
        raise InputError(f"the encoded image ({encoded.latent.shape[0]} x {encoded.geometry}) was not made from "
                         f"these {len(frames)} images at this resize and resolution ({geometry})")
    context_latents = [encoded.latent.to(device, dtype)]  # [B,16,h,w]
    soft_point_map = _point_maps(spec, geometry, len(frames), points, point_map)  # [B,Hp,Wp] or None
    if soft_point_map is not None:
        point_pixels = torch.stack([encode_point_map(m) for m in soft_point_map])  # [B,3,Hp,Wp]
        context_latents.append(codec.encode(point_pixels.to(device, dtype)))  # [B,16,h,w]

    # Pack each context latent; all of them share the ids (1, row, col).
    latent_hw = tuple(context_latents[0].shape[-2:])
    context_tokens, ids = pack_context(context_latents, dtype, device)  # [B,M,64], [N+M,3]
    n_target = ids.shape[0] - context_tokens.shape[1]

    # 3. The initial latent: the same fixed-seed noise for every frame, so videos do not flicker.
    if noise is None:
        noise = initial_noise(latent_hw, seed, device)  # [1,16,h,w] float32
    latent = check_noise(noise, latent_hw, len(frames)).to(device, dtype)

    # 4. Sample. Sigmas stay float32 so each update is computed and carried in float32, as in the reference.
    schedule = make_schedule(steps)
    sigmas = schedule.sigmas.to(device)
    guidance_batch = torch.full((len(frames),), guidance, dtype=dtype, device=device)
    first_velocity = None
    for i, timestep in enumerate(schedule.timesteps.to(device)):
        if on_step is not None:
            on_step(i, steps)
        tokens = torch.cat([pack_latents(latent.to(dtype)), context_tokens], dim=1)  # [B,N+M,64]
        t = timestep.to(dtype).expand(len(frames))  # [B]
        velocity = unpack_tokens(denoiser(tokens, ids, t, guidance_batch, prompt)[:, :n_target], latent_hw)
        first_velocity = velocity if first_velocity is None else first_velocity
        latent = euler_step(latent, velocity, sigmas[i : i + 1], sigmas[i + 1 : i + 2])  # float32 [B,16,h,w]

    # 5. Decode, postprocess in the decoder dtype, and return to the input size.
    decoded = codec.decode(latent.to(dtype))  # [B,3,Hp,Wp]
    postprocessed = postprocess(spec, decoded)  # [B,C,Hp,Wp]
    if not restore_output:
        return Perception(None, postprocessed, decoded, latent, first_velocity, soft_point_map, geometry)
    output = restore(postprocessed, geometry)  # [B,C,H,W]
    if spec.name == "normal" and geometry.resized_hw != geometry.input_hw:
        output = output / (output.norm(dim=1, keepdim=True) + NORMAL_EPS)  # interpolation shortens the vectors
    return Perception(output, postprocessed, decoded, latent, first_velocity, soft_point_map, geometry)


def postprocess(task: Task, decoded: torch.Tensor) -> torch.Tensor:
    """The reference ``vae_out_to_np``, computed in the decoder's dtype, then float32.

    depth, matting: ``(clip(x,-1,1)+1)/2``, then the channel mean -> [B,1,H,W] in [0,1].
    normal: ``x / (||x|| + 1e-8)`` over channels, no clipping -> [B,3,H,W] unit vectors.
    """
    if task.name == "normal":
        return (decoded / (decoded.norm(dim=1, keepdim=True) + NORMAL_EPS)).float()
    mapped01 = ((decoded.clamp(-1, 1) + 1) / 2).float()
    return mapped01.mean(dim=1, keepdim=True)


def as_frames(images) -> list:
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 3:
        return [images]
    frames = list(images)
    if not frames:
        raise InputError("no image given")
    shapes = {tuple(frame.shape) for frame in frames}
    if len(shapes) != 1:
        raise InputError(f"all images of a batch must have the same size, got {sorted(shapes)}")
    return frames


def _point_maps(spec: Task, geometry: Geometry, batch: int, points: PointPrompt | None, point_map
                ) -> torch.Tensor | None:
    """The soft point maps [B,Hp,Wp] in [0,1] for matting; None for the other tasks."""
    if not spec.uses_point_map:
        if points is not None or point_map is not None:
            logger.warning("the %s task takes no point prompt; ignoring it", spec.name)
        return None
    if points is not None and point_map is not None:
        raise InputError("give either a point prompt or a point map, not both")
    if points is not None:
        return pad_map(rasterize_point_prompt(points, geometry), geometry).expand(batch, -1, -1)  # [B,Hp,Wp]
    if point_map is not None:
        maps = _as_point_maps(point_map, geometry.input_hw, batch)
    else:
        logger.warning("matting without a point prompt: the model sees an empty point map (as the reference app)")
        maps = [np.zeros(geometry.input_hw, dtype=np.float32)] * batch
    return torch.stack([prepare_map(m, geometry) for m in maps])


def rasterize_point_prompt(points: PointPrompt, geometry: Geometry) -> np.ndarray:
    """The soft point map the model sees for ``points``: float32 [h',w'] in [0,1] at ``geometry.resized_hw``
    (before padding). Also what the node's point picker in the browser draws."""
    # Clicks and mask go to the processing size; build_point_map checks that the mode has what it needs.
    clicks = None if points.points_px is None else scale_coords(points.points_px, geometry.input_hw,
                                                                geometry.resized_hw)
    mask = None if points.mask is None else resize_map(points.mask, geometry)
    return build_point_map(points.mode, *geometry.resized_hw, points_px=clicks, mask=mask,
                           sigma_px=points.sigma_px, radius_px=points.radius_px)


def _as_point_maps(point_map, input_hw: tuple[int, int], batch: int) -> list:
    maps = point_map if point_map.ndim == 3 else point_map[None]
    if tuple(maps.shape[-2:]) != tuple(input_hw) or maps.shape[0] not in (1, batch):
        raise InputError(f"point map must be [H,W] or [B,H,W] with H,W = {tuple(input_hw)} and B = 1 or {batch}; "
                         f"got {tuple(point_map.shape)}")
    return list(maps) * (batch if maps.shape[0] == 1 else 1)


def check_noise(noise: torch.Tensor, latent_hw: tuple[int, int], batch: int, what: str = "noise") -> torch.Tensor:
    """``noise`` [1 or B,16,h,w] checked and expanded to [B,16,h,w]; ``what`` names it in errors."""
    expected = (LATENT_CHANNELS, *latent_hw)
    if noise.ndim != 4 or tuple(noise.shape[1:]) != expected or noise.shape[0] not in (1, batch):
        shape = ",".join(map(str, expected))
        allowed = f"[1,{shape}]" + (f" or [{batch},{shape}]" if batch > 1 else "")
        raise InputError(f"{what} must be {allowed} for this image and processing size, got {list(noise.shape)}")
    if not torch.isfinite(noise).all():
        raise InputError(f"{what} contains NaN or infinite values")
    return noise.expand(batch, *expected)
