"""The ComfyUI backend: Edit2Perceive's denoiser and latent codec over ComfyUI's own Flux model and VAE.

``e2p_core.pipeline.perceive`` runs the algorithm; this module only adapts ComfyUI objects to the two protocols of
``e2p_core.backends.base``, so a native MODEL keeps everything ComfyUI gives it: the memory manager
(``load_models_gpu``), fp8 / GGUF weights, LoRA patches, offloading, attention and block patches.

* The DiT runs through ``Flux.forward_orig`` on e2p_core's packed tokens and RoPE ids, so the matting point map sits
  at the same ids as the RGB context, as it was trained (ComfyUI's reference-latent methods shift or re-index it).
* The timestep sinusoid is e2p_core's (E2P-SPEC §1.8). ComfyUI computes it with exact float32 frequencies; the
  released weights were trained with bf16-rounded ones. A forward pre-hook on ``time_in`` feeds the chosen variant
  in for the duration of one call. (The guidance sinusoid needs no hook: the reference uses float32 there too.)
* The VAE runs without ``comfy.sd.VAE.decode``'s post-processing, which clamps to [0, 1] and would bend normals; the
  Flux latent format applies the shift and scale, as the ``LatentCodec`` contract asks.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import comfy.latent_formats
import comfy.ldm.flux.model
import comfy.model_management
import torch
from comfy.model_patcher import ModelPatcher
from comfy.sd import VAE

from ..e2p_core.errors import InputError
from ..e2p_core.prompts import PromptEmbeddings
from ..e2p_core.schedule import LATENT_CHANNELS, TRAINING_GRID_SIZE
from ..e2p_core.time_embedding import TimeEmbedding, check_time_embedding, sinusoid_frequencies, timestep_sinusoid

TOKEN_CHANNELS = 4 * LATENT_CHANNELS  # one token = a 2x2 patch of the 16-channel latent
LATENT_PIXELS_PER_TOKEN = 4


def check_flux_model(model: ModelPatcher) -> None:
    """Reject MODELs that are not a FLUX.1 DiT (SD, SDXL, Flux 2, Chroma, ...) with a message saying what is needed."""
    base = getattr(model, "model", None)
    flux = getattr(base, "diffusion_model", None)
    is_flux1 = (isinstance(flux, comfy.ldm.flux.model.Flux) and len(flux.params.axes_dim) == 3
                and flux.in_channels == TOKEN_CHANNELS and getattr(flux, "vector_in", None) is not None)
    if not is_flux1:
        found = type(base if flux is None else flux).__name__
        raise InputError(f"the MODEL is a {found}, not a FLUX.1 (Kontext) DiT with 16 latent channels; load the "
                         f"Edit2Perceive model with 'Edit2Perceive Model Loader' or core 'Load Diffusion Model'")


def check_flux_vae(vae: VAE) -> None:
    if getattr(vae, "first_stage_model", None) is None or vae.latent_channels != LATENT_CHANNELS:
        channels = getattr(vae, "latent_channels", "?")
        raise InputError(f"the VAE has {channels} latent channels; Edit2Perceive needs the Flux VAE (ae.safetensors, "
                         f"{LATENT_CHANNELS} channels) loaded with core 'Load VAE'")


def compute_dtype(model: ModelPatcher) -> torch.dtype:
    """The dtype the DiT computes in: the manual-cast dtype for fp8 (or other storage-only) weights, else theirs."""
    return model.model.manual_cast_dtype or model.model.get_dtype()


@contextmanager
def reference_time_sinusoid(flux: torch.nn.Module, timestep: torch.Tensor, variant: TimeEmbedding) -> Iterator[None]:
    """While active, ``flux.time_in`` receives e2p_core's sinusoid of ``timestep`` (E2P units, compute dtype) in
    ``variant`` instead of ComfyUI's, in ComfyUI's dtype and device."""
    frequencies = sinusoid_frequencies(variant, timestep.dtype, timestep.device)
    sinusoid = timestep_sinusoid(timestep, frequencies)  # [B,256] float32

    def replace_input(module, args):
        (comfy_sinusoid,) = args
        return (sinusoid.to(comfy_sinusoid),)

    handle = flux.time_in.register_forward_pre_hook(replace_input)
    try:
        yield
    finally:
        handle.remove()


class ComfyDenoiser:
    """:class:`e2p_core.backends.base.Denoiser` over a ComfyUI Flux ModelPatcher."""

    def __init__(self, model: ModelPatcher, time_embedding: TimeEmbedding = "reference"):
        check_flux_model(model)
        if not model.model.diffusion_model.params.guidance_embed:  # Kontext [dev] has one, Step1X-Edit none
            raise InputError("the MODEL has no guidance embedder: it is not FLUX.1 Kontext [dev] / Edit2Perceive "
                             "(a Step1X-Edit model from 'FE2E Model Loader' belongs to 'FE2E Perceive')")
        self.model = model
        self.time_embedding = check_time_embedding(time_embedding)
        self.dtype = compute_dtype(model)
        self.device = model.load_device

    def __call__(self, tokens, ids, timestep, guidance, prompt: PromptEmbeddings) -> torch.Tensor:
        batch, n_tokens = tokens.shape[:2]
        # ComfyUI sizes the working memory by batch x latent area; N tokens cover 4N latent pixels. Loading here, per
        # call, also brings the DiT back when the VAE pushed it out on a small GPU.
        latent_shape = (batch, LATENT_CHANNELS, LATENT_PIXELS_PER_TOKEN * n_tokens, 1)
        comfy.model_management.load_models_gpu([self.model], memory_required=self.model.memory_required(latent_shape))
        flux = self.model.model.diffusion_model
        text = prompt.prompt_embeds.to(self.device, self.dtype).expand(batch, -1, -1)  # [B,L,D]
        pooled = prompt.pooled_prompt_embeds.to(self.device, self.dtype).expand(batch, -1)  # [B,P]
        text_ids = prompt.text_ids.to(self.device, torch.float32).expand(batch, -1, -1)  # [B,L,3], all zero
        image_ids = ids.to(self.device, torch.float32).expand(batch, -1, -1)  # [B,N,3]
        sigmas = timestep.float() / TRAINING_GRID_SIZE  # ComfyUI's Flux takes sigma and scales it by 1000 itself
        transformer_options = {**self.model.model_options.get("transformer_options", {}), "sigmas": sigmas}
        with reference_time_sinusoid(flux, timestep, self.time_embedding):
            return flux.forward_orig(tokens.to(self.device, self.dtype), image_ids, text, text_ids, sigmas, pooled,
                                     guidance.to(self.device, self.dtype), transformer_options=transformer_options)


class ComfyCodec:
    """:class:`e2p_core.backends.base.LatentCodec` over a ComfyUI VAE: posterior mean, Flux shift and scale.

    The VAE keeps its own dtype and device; latents are exchanged in the denoiser's ``dtype`` on its ``device``.
    Decoded pixels stay in the VAE's dtype, so the postprocess runs at the decoder's precision.
    """

    def __init__(self, vae: VAE, dtype: torch.dtype, device: torch.device):
        check_flux_vae(vae)
        self.vae = vae
        self.dtype = dtype
        self.device = device
        self.latent_format = comfy.latent_formats.Flux()

    # ComfyUI's VAE memory estimates are per frame (comfy.sd.VAE splits batches by them); the whole chunk runs at once.
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        memory = vae.memory_used_encode(pixels.shape, vae.vae_dtype) * pixels.shape[0]
        comfy.model_management.load_models_gpu([vae.patcher], memory_required=memory)
        mean = vae.first_stage_model.encode(pixels.to(vae.device, vae.vae_dtype))  # [B,16,H/8,W/8], never a sample
        return self.latent_format.process_in(mean).to(self.device, self.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        memory = vae.memory_used_decode(latents.shape, vae.vae_dtype) * latents.shape[0]
        comfy.model_management.load_models_gpu([vae.patcher], memory_required=memory)
        unscaled = self.latent_format.process_out(latents.to(vae.device, vae.vae_dtype))
        return vae.first_stage_model.decode(unscaled).to(self.device)  # [B,3,8h,8w], raw decoder output
