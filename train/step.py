"""One training forward: the inference token layout with a noisy target, the flow-matching loss and (when λ > 0
or under ``--objective reference``) the consistency loss on the decoded clean estimate.

The DiT input is built exactly as ``e2p_core.pipeline.perceive`` builds it: every Kontext context image (the RGB
and, for matting, the point map as ``map*2-1``) is VAE-encoded and packed with ids (1, row, col), the target
tokens get (0, row, col), the text comes from the task's prompt embeddings, guidance is 1.
"""

from dataclasses import dataclass

import torch

from e2p_core.backends.base import Denoiser, LatentCodec
from e2p_core.points import encode_point_map
from e2p_core.prompts import PromptEmbeddings
from e2p_core.tasks import get_task
from e2p_core.tokens import pack_context, pack_latents, unpack_tokens

from .losses import MATTING_UNKNOWN, consistency_loss
from .noise import training_noise
from .objective import (
    adaptive_lambda,
    clean_estimate,
    consistency_ramp,
    flow_matching_loss,
    latent_mask,
    noisy_latent,
    sample_timesteps,
    target_velocity,
)

OBJECTIVES = ("paper", "reference")


@dataclass(frozen=True)
class ObjectiveConfig:
    task: str
    objective: str = "paper"  # "paper": L_FM + λ L_Cons; "reference": the released code's consistency loss only
    noise_seed: int = 42
    multi_res_noise: bool = True
    lambda_start_epoch: float = 1.0


def context_pixels(task: str, batch: dict, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """The Kontext context images in [-1,1]: the RGB, then (matting) the point map on 3 channels."""
    contexts = [batch["image"].to(device, dtype)]
    if get_task(task).uses_point_map:
        maps = torch.stack([encode_point_map(m[0].numpy()) for m in batch["point_map"].float().cpu()])
        contexts.append(maps.to(device, dtype))
    return contexts


def training_losses(denoiser: Denoiser, codec: LatentCodec, prompt: PromptEmbeddings, batch: dict,
                    config: ObjectiveConfig, generator: torch.Generator, step: int, steps_per_epoch: float
                    ) -> dict[str, torch.Tensor | float]:
    """Losses of one micro-batch: ``loss`` (a tensor) is what to back-propagate; ``loss_fm``,
    ``loss_consistency`` (only when computed) and ``lambda`` are plain floats for logging."""
    dtype, device = denoiser.dtype, denoiser.device
    contexts = context_pixels(config.task, batch, codec.dtype, device)
    with torch.no_grad():  # the VAE is frozen; only the decoder of the consistency loss passes gradients
        context_latents = [codec.encode(pixels).to(dtype) for pixels in contexts]
        clean = codec.encode(batch["target"].to(device, codec.dtype)).float()  # z1 [B,16,h,w]
    size, latent_hw = clean.shape[0], tuple(clean.shape[-2:])
    context_tokens, ids = pack_context(context_latents, dtype, device)  # [B,M,64], [N+M,3]
    n_target = ids.shape[0] - context_tokens.shape[1]

    times = sample_timesteps(size, generator, dtype, device)
    noise = training_noise(size, latent_hw, times.timestep, config.noise_seed, device, config.multi_res_noise)
    noisy = noisy_latent(clean, noise, times.sigma)
    tokens = torch.cat([pack_latents(noisy.to(dtype)), context_tokens], dim=1)
    guidance = torch.ones(size, dtype=dtype, device=device)
    output = denoiser(tokens, ids, times.timestep, guidance, prompt)
    velocity = unpack_tokens(output[:, :n_target], latent_hw)

    valid = batch["valid"].to(device)
    if config.objective == "reference" and config.task == "matting":
        valid = batch["trimap"].to(device) == MATTING_UNKNOWN  # the reference's --with_mask: the unknown band
    loss_fm = flow_matching_loss(velocity, target_velocity(clean, noise), times.weight, latent_mask(valid, latent_hw))
    losses: dict[str, torch.Tensor | float] = {"loss_fm": float(loss_fm.detach())}

    # The reference objective always needs the decoded estimate; the paper's only once λ can be non-zero.
    ramp = 1.0 if config.objective == "reference" else consistency_ramp(step, steps_per_epoch,
                                                                       config.lambda_start_epoch)
    if ramp == 0:  # λ = 0 during the first epoch(s): skip the decoder entirely
        losses.update(loss=loss_fm, **{"lambda": 0.0})
        return losses
    decoded = codec.decode(clean_estimate(noisy, velocity, times.timestep).to(codec.dtype))  # [B,3,H,W]
    on_device = {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}
    loss_consistency = consistency_loss(config.task, config.objective, decoded, on_device, times.weight)
    losses["loss_consistency"] = float(loss_consistency.detach())
    if config.objective == "reference":
        losses.update(loss=loss_consistency, **{"lambda": 1.0})
    else:
        weight = adaptive_lambda(loss_fm, loss_consistency, ramp)
        losses.update(loss=loss_fm + weight * loss_consistency, **{"lambda": weight})
    return losses
