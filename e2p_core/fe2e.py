"""FE2E inference: one image -> depth AND surface normals from one DiT pass (AMAP-ML/FE2E, the official
``ImageGenerator.generate_image`` with ``--prompt_type empty``).

FE2E runs the Step1X-Edit DiT with one LoRA. It shares Edit2Perceive's stages (``e2p_core.pipeline``): packing,
position ids, the denoiser/codec seam, decoding and restoring the input size. What differs is named here:

* **sequence**: ``[target | reference]``, both halves with the SAME RoPE ids (0, row, col) (Kontext gives the
  context index 1); the text is Step1X's connector over the cached empty-prompt embedding (``connector``);
* **input**: FE2E's size buckets, ``F.interpolate`` bilinear without antialias on ``x/255``, ``x*2-1``;
* **encode**: the VAE posterior is SAMPLED (``mean + std * eps``, eps seeded or given), not its mean;
* **start**: a zero latent for 1 step, seeded noise for N steps (in the compute dtype, as the reference draws it);
* **schedule**: FE2E's resolution-shifted times (``schedule.fe2e_timesteps``); the DiT sees ``1000 * t`` with t
  rounded to the compute dtype, the Euler factor uses the unrounded times, and the target stays in the compute dtype;
* **readout**: depth = the Euler result on the target half; normals = the raw last prediction on the REFERENCE half;
* **no CFG**: the reference runs a conditional and an unconditional row with the same empty prompt, so
  ``uncond + 6 * (cond - uncond) == cond``; the combination is skipped. ``cfg_rows=2`` (the default) still runs
  the two identical rows in one batch, because a GEMM's rounding depends on its row count on CPU: that makes bf16
  runs bit-exact with the reference there; ``cfg_rows=1`` halves the DiT work and agrees to bf16 rounding.
* **postprocessing**: depth ``clamp(-1,1)`` -> [0,1], channel mean; normals ``clamp(-1,1)``; both resized back
  bilinearly (align_corners=False, no antialias), normals made unit with a 1e-9 floor (FE2E's evaluation).

Outputs are in the Edit2Perceive reference conventions: depth affine-invariant in [0,1], near = 0
(``depth_affine01``); normals in the training frame +x left, +y up, +z toward the camera (``normals_e2p``).
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from .backends.base import Denoiser
from .connector import PromptCache
from .errors import InputError
from .images import Geometry, check_image_size, plan_geometry
from .pipeline import as_frames, check_noise
from .schedule import LATENT_CHANNELS, fe2e_timesteps
from .tokens import TARGET_INDEX, pack_latents, position_ids, unpack_tokens

DEFAULT_SEED = 1234  # FE2E's evaluation seed
NORMAL_FLOOR = 1e-9  # FE2E's evaluation: norm[norm < 1e-9] = 1e-9
MULTIPLE_OF = 16
# FE2E's size buckets: inputs up to (width, height) are processed at (width, height); larger ones natively.
BUCKETS = (((1024, 768), (1024, 768)), ((1280, 960), (1216, 352)), ((6048, 4032), (864, 576)))

Resolution = int | Literal["native", "buckets"] | tuple[int, int]


@dataclass
class Fe2ePerception:
    """Everything one FE2E run produced; batch-first."""

    depth: torch.Tensor  # float32 [B,1,H,W] in [0,1] at the input size (depth_affine01)
    normal: torch.Tensor  # float32 [B,3,H,W] unit vectors at the input size (normals_e2p)
    depth_decoded: torch.Tensor  # float32 [B,3,Hp,Wp]: raw VAE output of the depth latent, processing size
    normal_decoded: torch.Tensor  # float32 [B,3,Hp,Wp]: raw VAE output of the normal latent
    depth_latent: torch.Tensor  # float32 [B,16,h,w]: the Euler result on the target half
    normal_latent: torch.Tensor  # float32 [B,16,h,w]: the last prediction on the reference half
    prediction: torch.Tensor  # model dtype [B,2N,64]: the first DiT output, both halves, token layout
    depth_processing: torch.Tensor  # float32 [B,1,Hp,Wp] in [0,1]: depth at the processing size (evaluation resizes)
    normal_processing: torch.Tensor  # float32 [B,3,Hp,Wp]: clamped normals at the processing size, not yet unit
    geometry: Geometry


def plan_fe2e_geometry(input_hw: tuple[int, int], resize: Literal["aligned", "reference"] = "reference",
                       resolution: Resolution = "buckets") -> Geometry:
    """``buckets`` (FE2E's table), ``(height, width)`` exactly, or Edit2Perceive's ``native``/N in ``resize`` mode."""
    height, width = (int(side) for side in input_hw)
    check_image_size(height, width)
    if resolution == "buckets":
        size = next(((bh, bw) for (max_w, max_h), (bw, bh) in BUCKETS if width <= max_w and height <= max_h), None)
        if size is None:  # beyond the table the reference keeps the size; the model needs multiples of 16
            return plan_geometry((height, width), resize, "native")
        return Geometry((height, width), size, size, resize)
    if isinstance(resolution, tuple):
        size = tuple(int(side) for side in resolution)
        if len(size) != 2 or min(size) < MULTIPLE_OF or any(side % MULTIPLE_OF for side in size):
            raise InputError(f"processing size {resolution} (height, width) must be two multiples of {MULTIPLE_OF}")
        return Geometry((height, width), size, size, resize)
    return plan_geometry((height, width), resize, resolution)


@torch.no_grad()
def perceive_fe2e(
    denoiser: Denoiser,
    codec,
    images: Sequence[np.ndarray] | np.ndarray | torch.Tensor,
    prompt: PromptCache,
    *,
    steps: int = 1,
    seed: int = DEFAULT_SEED,
    noise: torch.Tensor | None = None,
    encode_noise: torch.Tensor | None = None,
    resize: Literal["aligned", "reference"] = "reference",
    resolution: Resolution = "buckets",
    cfg_rows: Literal[1, 2] = 2,
    on_step: Callable[[int, int], None] | None = None,
) -> Fe2ePerception:
    """Run FE2E on a batch of same-size images ([B,H,W,3] uint8 or float in [0,1], or one [H,W,3]).

    ``encode_noise`` ([1 or B,16,h,w] float32) is the posterior sample's eps, ``noise`` the start latent; both are
    drawn from ``seed`` when not given (the reference seeds both from the same seed). ``on_step(i, steps)`` runs
    before every DiT call.
    """
    if cfg_rows not in (1, 2):
        raise InputError(f"cfg_rows must be 1 or 2, got {cfg_rows!r}")
    frames = as_frames(images)
    geometry = plan_fe2e_geometry(frames[0].shape[:2], resize, resolution)
    dtype, device = denoiser.dtype, denoiser.device
    latent_hw = (geometry.padded_hw[0] // 8, geometry.padded_hw[1] // 8)
    batch = len(frames)

    # 1. The reference image in [-1,1] at the processing size, resized like FE2E's tensor path.
    pixels = torch.stack([prepare_fe2e_image(frame, geometry) for frame in frames])  # float32 [B,3,Hp,Wp]

    # 2. Encode by SAMPLING the posterior (FE2E's VAE is float32 throughout); pack it in the compute dtype.
    if encode_noise is None:
        encode_noise = seeded_randn(latent_hw, seed, device, torch.float32)  # [1,16,h,w]
    eps = check_noise(encode_noise, latent_hw, batch, "encode noise")
    reference = codec.encode_sample(pixels.to(codec.device, codec.dtype), eps)  # float32 [B,16,h,w]
    reference_tokens = pack_latents(reference).to(device, dtype)  # [B,N,64]
    n_target = reference_tokens.shape[1]
    # Both halves share the ids (0, row, col): FE2E tells them apart by position in the sequence only.
    half_ids = position_ids(latent_hw, TARGET_INDEX, torch.float32, device)  # [N,3]
    ids = torch.cat([half_ids, half_ids])  # [2N,3]

    # 3. The start latent: zero for the 1-step model, noise drawn in the compute dtype for N steps.
    if noise is not None:
        start = check_noise(noise, latent_hw, batch, "noise")
    elif steps == 1:
        start = torch.zeros(1, LATENT_CHANNELS, *latent_hw)
    else:
        start = seeded_randn(latent_hw, seed, device, dtype)
    target = pack_latents(start.to(device, dtype).expand(batch, -1, -1, -1))  # [B,N,64]

    # 4. Sample on FE2E's shifted times; the reference half stays clean. The DiT sees 1000 * t with t rounded to
    #    the compute dtype; the Euler factor is the unrounded difference and the target stays in the compute dtype.
    times = fe2e_timesteps(steps, n_target)
    first_prediction = prediction = None
    for i, (t_current, t_next) in enumerate(zip(times[:-1], times[1:])):
        if on_step is not None:
            on_step(i, steps)
        timestep = torch.full((batch,), t_current, dtype=dtype, device=device) * 1000  # [B]
        tokens = torch.cat([target, reference_tokens], dim=1).repeat(cfg_rows, 1, 1)  # [rows*B,2N,64]
        prediction = denoiser(tokens, ids, timestep.repeat(cfg_rows), None, prompt)[:batch]  # [B,2N,64]
        first_prediction = prediction if first_prediction is None else first_prediction
        target = target + (t_next - t_current) * prediction[:, :n_target]

    # 5. Read both maps out: depth from the sampled target, normals from the last prediction's reference half.
    depth_latent = unpack_tokens(target.float(), latent_hw)  # [B,16,h,w]
    normal_latent = unpack_tokens(prediction[:, n_target:].float(), latent_hw)  # [B,16,h,w]
    depth_decoded = codec.decode(depth_latent.to(codec.dtype)).float()  # [B,3,Hp,Wp]
    normal_decoded = codec.decode(normal_latent.to(codec.dtype)).float()  # [B,3,Hp,Wp]

    # 6. Postprocess as FE2E's evaluation does and return to the input size.
    depth_processing = depth_decoded.clamp(-1, 1).mul(0.5).add(0.5).mean(dim=1, keepdim=True)  # [B,1,Hp,Wp]
    normal_processing = normal_decoded.clamp(-1, 1)  # [B,3,Hp,Wp]
    depth = restore_fe2e(depth_processing, geometry)  # [B,1,H,W]
    normal = restore_fe2e(normal_processing, geometry)  # [B,3,H,W]
    normal = normal / torch.linalg.norm(normal, dim=1, keepdim=True).clamp_min(NORMAL_FLOOR)
    return Fe2ePerception(depth, normal, depth_decoded, normal_decoded, depth_latent, normal_latent,
                          first_prediction, depth_processing, normal_processing, geometry)


def prepare_fe2e_image(frame: np.ndarray | torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """[H,W,3] uint8 (or float in [0,1]) -> float32 [3,Hp,Wp] in [-1,1]: ``x/255``, bilinear (no antialias),
    ``clamp(0,1)``, edge padding (aligned mode only), ``*2-1``."""
    array = frame.detach().cpu().numpy() if isinstance(frame, torch.Tensor) else np.asarray(frame)
    if array.ndim != 3 or array.shape[2] != 3:
        raise InputError(f"image has shape {tuple(array.shape)}; expected one RGB frame [H,W,3]")
    if tuple(array.shape[:2]) != geometry.input_hw:
        raise InputError(f"image is {array.shape[1]}x{array.shape[0]}; the geometry was planned for "
                         f"{geometry.input_hw[1]}x{geometry.input_hw[0]}")
    unit = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None]
    if unit.dtype == torch.uint8:
        unit = unit.to(torch.float32).div(255)
    elif unit.is_floating_point():
        unit = unit.to(torch.float32)
        if not torch.isfinite(unit).all():
            raise InputError("image contains NaN or infinite values")
    else:
        raise InputError(f"image has dtype {array.dtype}; expected uint8 (0..255) or float (0..1)")
    resized = F.interpolate(unit, size=geometry.resized_hw, mode="bilinear", align_corners=False).clamp(0, 1)
    pad_h, pad_w = geometry.padded_hw[0] - geometry.resized_hw[0], geometry.padded_hw[1] - geometry.resized_hw[1]
    padded = F.pad(resized, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else resized
    return (padded * 2 - 1)[0]


def restore_fe2e(maps: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """[B,C,Hp,Wp] -> float32 [B,C,H,W]: crop the padding, resize bilinearly (align_corners=False, no antialias,
    like FE2E's cv2.resize / F.interpolate)."""
    height, width = geometry.resized_hw
    content = maps[:, :, :height, :width].float()
    if (height, width) == geometry.input_hw:
        return content.contiguous()
    return F.interpolate(content, size=geometry.input_hw, mode="bilinear", align_corners=False)


def seeded_randn(latent_hw: tuple[int, int], seed: int, device, dtype: torch.dtype) -> torch.Tensor:
    """``randn`` [1,16,h,w] drawn directly in ``dtype`` from ``torch.Generator(device).manual_seed(seed)``."""
    generator = torch.Generator(device).manual_seed(int(seed))
    return torch.randn((1, LATENT_CHANNELS, *latent_hw), generator=generator, device=device, dtype=dtype)
