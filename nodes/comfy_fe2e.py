"""FE2E over ComfyUI's own Flux model and VAE: the denoiser and codec that ``e2p_core.fe2e.perceive_fe2e`` needs.

Step1X-Edit's DiT is a FLUX.1 DiT without the guidance embedder, so ComfyUI's ``Flux`` class runs it as a native
MODEL (a ModelPatcher: memory manager, LoRA patches, offloading). What Step1X adds is its Qwen2 connector
(``connector.*`` in the same checkpoint), which turns the cached empty-prompt embedding and the timestep into the
text tokens and pooled vector at every call; it is plain torch (``e2p_core.connector``).

* The timestep sinusoid is FE2E's: exact float32 frequencies of ``1000 * t`` with t in the compute dtype; ComfyUI
  multiplies ``t`` by 1000 itself in float32, so the pre-hook of ``nodes.comfy_backend`` feeds FE2E's in.
* The VAE encode SAMPLES the posterior (mean + std * eps), read from the encoder's moments, as FE2E does.
"""

from pathlib import Path

import comfy.model_management
import torch
from comfy.model_patcher import ModelPatcher
from comfy.sd import VAE

from ..e2p_core.checkpoints import (
    dequantize,
    infer_dit_architecture,
    load_config_json,
    load_state_dict,
    strip_prefixes,
    weights_must_fit,
)
from ..e2p_core.connector import (
    PromptCache,
    Qwen2Connector,
    build_connector,
    infer_connector_architecture,
    split_connector,
)
from ..e2p_core.errors import CheckpointError, InputError
from ..e2p_core.schedule import LATENT_CHANNELS
from ..e2p_core.weights import check_connector_fits, check_dit_family, check_lora_family
from .comfy_backend import ComfyCodec, check_flux_model, compute_dtype, reference_time_sinusoid
from .loader import add_lora_patches, flux_model_from_state_dict, model_options_for

LATENT_PIXELS_PER_TOKEN = 4


class ComfyStep1XDenoiser:
    """:class:`e2p_core.backends.base.Denoiser` for FE2E over a ComfyUI Flux ModelPatcher + the Step1X connector."""

    def __init__(self, model: ModelPatcher, connector: Qwen2Connector):
        check_flux_model(model)
        flux = model.model.diffusion_model
        if flux.params.guidance_embed:
            raise InputError("the MODEL has FLUX's guidance embedder: it is a FLUX / Edit2Perceive DiT, not FE2E's "
                             "Step1X-Edit; load it with 'FE2E Model Loader'")
        if flux.txt_in.in_features != connector.arch.hidden_size:
            raise InputError(f"the FE2E conditioning's connector gives {connector.arch.hidden_size}-wide text, the "
                             f"MODEL takes {flux.txt_in.in_features}: use the connector of the same checkpoint")
        self.model = model
        self.dtype = compute_dtype(model)
        self.device = model.load_device
        self.connector = connector.to(self.device, self.dtype)

    def __call__(self, tokens, ids, timestep, guidance, prompt: PromptCache) -> torch.Tensor:
        batch, n_tokens = tokens.shape[:2]
        latent_shape = (batch, LATENT_CHANNELS, LATENT_PIXELS_PER_TOKEN * n_tokens, 1)
        comfy.model_management.load_models_gpu([self.model], memory_required=self.model.memory_required(latent_shape))
        flux = self.model.model.diffusion_model
        timestep = timestep.to(self.device, self.dtype)  # [B], 1000 * t
        text, pooled = self.connector(prompt.embeds.to(self.device).repeat(batch, 1, 1), timestep,
                                      prompt.mask.to(self.device).repeat(batch, 1))  # [B,L,D], [B,P]
        text_ids = torch.zeros(batch, text.shape[1], 3, device=self.device)
        image_ids = ids.to(self.device, torch.float32).expand(batch, -1, -1)  # [B,2N,3]
        sigmas = timestep.float() / 1000
        transformer_options = {**self.model.model_options.get("transformer_options", {}), "sigmas": sigmas}
        with reference_time_sinusoid(flux, timestep, "exact"):
            return flux.forward_orig(tokens.to(self.device, self.dtype), image_ids, text, text_ids, sigmas, pooled,
                                     None, transformer_options=transformer_options)


class ComfyPosteriorCodec(ComfyCodec):
    """:class:`ComfyCodec` with FE2E's encode: a posterior SAMPLE ``mean + exp(logvar/2) * eps``."""

    def __init__(self, vae: VAE, device: torch.device):
        super().__init__(vae, torch.float32, device)  # FE2E keeps its latents in float32

    def encode_sample(self, pixels: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        memory = vae.memory_used_encode(pixels.shape, vae.vae_dtype) * pixels.shape[0]
        comfy.model_management.load_models_gpu([vae.patcher], memory_required=memory)
        autoencoder = vae.first_stage_model
        moments = autoencoder.encoder(pixels.to(vae.device, vae.vae_dtype))  # [B,32,H/8,W/8]
        if getattr(autoencoder, "quant_conv", None) is not None:
            moments = autoencoder.quant_conv(moments)
        mean, logvar = moments.float().chunk(2, dim=1)
        sample = mean + torch.exp(0.5 * logvar) * eps.to(mean.device, mean.dtype)
        return self.latent_format.process_in(sample).to(self.device, self.dtype)


def load_fe2e_model(dit_path: str | Path, lora_path: str | Path | None = None, lora_strength: float = 1.0,
                    weight_dtype: str = "default") -> tuple[ModelPatcher, Qwen2Connector]:
    """``step1x-edit-i1258.safetensors`` (+ FE2E's LoRA as patches) -> (a ComfyUI Flux MODEL, the connector).

    Non-FLUX sizes (test models) need a diffusers-style ``<name>.json`` beside the file, as for Edit2Perceive; it may
    carry the ``connector`` object of ``--dit-config``. ``weight_dtype`` is core UNETLoader's storage choice.
    """
    dit_path = Path(dit_path)
    state_dict = strip_prefixes(load_state_dict(dit_path))
    check_dit_family(state_dict, dit_path.name, "fe2e")
    if lora_path is not None:
        check_lora_family(lora_path, "fe2e")
    dit_state_dict, connector_state_dict = split_connector(state_dict)
    sidecar = dit_path.with_suffix(".json")
    config = load_config_json(sidecar) if sidecar.is_file() else {}
    architecture = infer_dit_architecture(dit_state_dict, config)
    if architecture.axes_dims_rope is None:
        raise CheckpointError(f"{dit_path.name}: head size {architecture.head_dim} is not FLUX's; put a "
                              f"diffusers-style {sidecar.name} with 'axes_dims_rope' beside it")
    connector_state_dict = dequantize(connector_state_dict, torch.float32)
    connector_architecture = infer_connector_architecture(connector_state_dict, config.get("connector"))
    check_connector_fits(connector_architecture, architecture, dit_path.name)
    with weights_must_fit(dit_path.name):
        model = flux_model_from_state_dict(dit_state_dict, architecture, model_options_for(weight_dtype))
    if lora_path is not None:
        model = add_lora_patches(model, lora_path, lora_strength, architecture)
    return model, build_connector(connector_state_dict, connector_architecture, torch.float32, "cpu")
