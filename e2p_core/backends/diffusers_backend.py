"""The diffusers backend: ``FluxTransformer2DModel`` and ``AutoencoderKL`` built locally from a config, running
the reference numerics in float32 or bf16 on CPU or GPU. Train and the CLI use it; ComfyUI nodes never import it.

Two details of the DiffSynth reference that diffusers does differently are reproduced here:
* the timestep embedding (frequency rounding, see ``e2p_core.time_embedding``) and the conditioning summed as
  ``(time + pooled text) + guidance``;
* the q/k RMSNorm, which normalises in float32, rounds to the model dtype and only then multiplies by the weight
  (``torch.nn.RMSNorm`` rounds once; the difference is one bf16 ulp).

How the DiT's weights are stored (full, fp8, offloaded, GGUF-quantised) is the ``memory_mode``, see ``memory``.
"""

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel

from ..checkpoints import DiTArchitecture, VAEArchitecture, bfl_to_diffusers, weights_must_fit
from ..errors import CheckpointError
from ..prompts import PromptEmbeddings
from ..time_embedding import (
    TimeEmbedding,
    check_time_embedding,
    resolve_time_embedding,
    sinusoid_frequencies,
    timestep_sinusoid,
)
from ..weights import DiTWeights, VAEWeights
from .memory import MemoryMode, builds_on_host, check_memory_mode, place_transformer

GUIDANCE_SCALE_FACTOR = 1000.0  # Flux embeds guidance like a timestep: 1.0 -> 1000


class ReferenceRMSNorm(torch.nn.Module):
    """DiffSynth's RMSNorm: ``(x * rsqrt(mean(x^2) + eps)).to(dtype) * weight``. Same parameter name as nn.RMSNorm."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(dim))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        variance = hidden_states.float().square().mean(-1, keepdim=True)
        normed = (hidden_states * torch.rsqrt(variance + self.eps)).to(hidden_states.dtype)
        return normed * self.weight


class Float32RMSNorm(torch.nn.Module):
    """Step1X-Edit's q/k RMSNorm (Liger's "gemma" casting): normalise AND weight in float32, round once."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(dim))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.float()
        normed = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(hidden_states.dtype)


QK_NORMS = {"diffsynth": ReferenceRMSNorm, "float32": Float32RMSNorm}


class ReferenceFluxTransformer(FluxTransformer2DModel):
    """Flux DiT whose forward takes E2P timesteps (1000 * sigma) and returns the image-token velocity.

    Same parameters and state-dict keys as ``FluxTransformer2DModel``; only the forward and the q/k norms differ
    (``qk_norm``: ``diffsynth`` for Edit2Perceive, ``float32`` for FE2E's Step1X-Edit).
    """

    def __init__(self, *args, time_embedding: TimeEmbedding = "reference", qk_norm: str = "diffsynth", **kwargs):
        super().__init__(*args, **kwargs)
        self.time_embedding = check_time_embedding(time_embedding)
        for module in self.modules():
            for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
                norm = getattr(module, name, None)
                if isinstance(norm, torch.nn.RMSNorm):
                    setattr(module, name, QK_NORMS[qk_norm](norm.normalized_shape[0], norm.eps))

    def conditioning(self, timestep, guidance, pooled_projections, dtype) -> torch.Tensor:
        """The modulation vector of every block, [B,hidden], in the reference's summation order."""
        embedders = self.time_text_embed
        frequencies = sinusoid_frequencies(self.time_embedding, timestep.dtype, timestep.device)
        time_emb = embedders.timestep_embedder(timestep_sinusoid(timestep, frequencies).to(dtype))
        conditioning = time_emb + embedders.text_embedder(pooled_projections)
        if guidance is not None and hasattr(embedders, "guidance_embedder"):
            exact = sinusoid_frequencies("exact", torch.float32, guidance.device)
            guidance_sinusoid = timestep_sinusoid(guidance * GUIDANCE_SCALE_FACTOR, exact)
            conditioning = conditioning + embedders.guidance_embedder(guidance_sinusoid.to(dtype))
        return conditioning

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                guidance=None):
        hidden_states = self.x_embedder(hidden_states)  # [B,N,hidden]
        temb = self.conditioning(timestep, guidance, pooled_projections, hidden_states.dtype)  # [B,hidden]
        encoder_hidden_states = self.context_embedder(encoder_hidden_states)  # [B,L,hidden]
        rotary = self.pos_embed(torch.cat([txt_ids, img_ids], dim=0))  # text first, as in attention

        for block in [*self.transformer_blocks, *self.single_transformer_blocks]:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                encoder_hidden_states, hidden_states = self._gradient_checkpointing_func(
                    block, hidden_states, encoder_hidden_states, temb, rotary
                )
            else:
                encoder_hidden_states, hidden_states = self.run_block(block, hidden_states, encoder_hidden_states,
                                                                      temb, rotary)

        hidden_states = self.norm_out(hidden_states, temb)
        return self.proj_out(hidden_states)  # [B,N,64]

    def run_block(self, block, hidden_states, encoder_hidden_states, temb, rotary):
        """One double or single block -> (text stream, image stream); a model family may round differently."""
        return block(hidden_states, encoder_hidden_states, temb, rotary)


class DiffusersDenoiser:
    """:class:`e2p_core.backends.base.Denoiser` over a :class:`ReferenceFluxTransformer`."""

    def __init__(self, transformer: ReferenceFluxTransformer, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        self.transformer = transformer
        # Given explicitly when the weights' own dtype/device are not the compute ones (fp8 storage, offloading).
        self.dtype = dtype or transformer.dtype
        self.device = torch.device(device) if device is not None else transformer.device

    def __call__(self, tokens, ids, timestep, guidance, prompt: PromptEmbeddings) -> torch.Tensor:
        batch = tokens.shape[0]
        text = prompt.prompt_embeds.expand(batch, -1, -1)  # [B,L,D]
        text_ids = torch.zeros(text.shape[1], 3, dtype=ids.dtype, device=ids.device)
        return self.transformer(
            hidden_states=tokens,
            encoder_hidden_states=text,
            pooled_projections=prompt.pooled_prompt_embeds.expand(batch, -1),
            timestep=timestep,
            img_ids=ids,
            txt_ids=text_ids,
            guidance=guidance,
        )


class DiffusersCodec:
    """:class:`e2p_core.backends.base.LatentCodec` over ``AutoencoderKL``: posterior mean, then shift and scale."""

    def __init__(self, vae: AutoencoderKL):
        self.vae = vae
        self.dtype = vae.dtype
        self.device = vae.device
        self.shift = vae.config.shift_factor
        self.scale = vae.config.scaling_factor

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        mean = self.vae.encode(pixels).latent_dist.mode()  # [B,16,H/8,W/8]; the mean, never a sample
        return (mean - self.shift) * self.scale

    def encode_sample(self, pixels: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """FE2E's encode: the posterior SAMPLE ``mean + exp(logvar/2) * eps`` (``eps`` [1 or B,16,h,w]), then shift
        and scale. The moments are read unclamped, as BFL's ``DiagonalGaussian`` uses them."""
        mean, logvar = self.vae.encode(pixels).latent_dist.parameters.chunk(2, dim=1)  # each [B,16,H/8,W/8]
        sample = mean + torch.exp(0.5 * logvar) * eps.to(mean.device, mean.dtype)
        return (sample - self.shift) * self.scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.scale + self.shift).sample  # [B,3,H,W]


def build_transformer(
    state_dict_diffusers: dict[str, torch.Tensor],
    architecture: DiTArchitecture,
    dtype: torch.dtype,
    device: torch.device | str,
    time_embedding: TimeEmbedding = "reference",
    qk_norm: str = "diffsynth",
    model_class: type[ReferenceFluxTransformer] = ReferenceFluxTransformer,
) -> ReferenceFluxTransformer:
    """Build on the meta device and adopt the given tensors (no second copy of the weights in memory).

    GGUF-quantised weights (``backends.gguf``) stay quantised, in ``GGUFLinear`` layers computing in ``dtype``.
    """
    with torch.device("meta"):
        transformer = model_class(**architecture.to_diffusers_config(), time_embedding=time_embedding,
                                  qk_norm=qk_norm)
    quantized = {key: value for key, value in state_dict_diffusers.items() if _is_gguf_quantized(value)}
    if quantized:
        from .gguf import adopt_quantized_weights

        adopt_quantized_weights(transformer, quantized, dtype, device)
    weights = {key: tensor.to(device=device, dtype=dtype) for key, tensor in state_dict_diffusers.items()
               if key not in quantized}
    with weights_must_fit("the DiT"):
        missing, unexpected = transformer.load_state_dict(weights, strict=not quantized, assign=True)
    if set(missing) != set(quantized) or unexpected:
        raise CheckpointError(f"DiT weights do not fit the model: missing {sorted(set(missing) - set(quantized))[:5]}, "
                              f"unexpected {unexpected[:5]}")
    return transformer.eval().requires_grad_(False)


def build_vae(
    state_dict_diffusers: dict[str, torch.Tensor],
    architecture: VAEArchitecture,
    dtype: torch.dtype,
    device: torch.device | str,
) -> AutoencoderKL:
    with torch.device("meta"):
        vae = AutoencoderKL(**architecture.to_diffusers_config())
    weights = {key: tensor.to(device=device, dtype=dtype) for key, tensor in state_dict_diffusers.items()}
    with weights_must_fit("the VAE"):
        vae.load_state_dict(weights, strict=True, assign=True)
    return vae.eval().requires_grad_(False)


def _is_gguf_quantized(tensor: torch.Tensor) -> bool:
    """A GGUF ``GGUFParameter`` (see ``backends.gguf``), told by its attribute so that gguf is only imported when
    such weights are present."""
    return hasattr(tensor, "quant_type")


def load_diffusers_backend(
    dit: DiTWeights,
    vae: VAEWeights,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    time_embedding: str | None = None,
    memory_mode: MemoryMode = "full",
) -> tuple[DiffusersDenoiser, DiffusersCodec]:
    """Denoiser and codec from loaded weights (:func:`load_diffusers_denoiser`, :func:`load_diffusers_codec`)."""
    return (load_diffusers_denoiser(dit, dtype, device, time_embedding, memory_mode),
            load_diffusers_codec(vae, dtype, device))


def load_diffusers_denoiser(
    dit: DiTWeights,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    time_embedding: str | None = None,
    memory_mode: MemoryMode = "full",
) -> DiffusersDenoiser:
    """The denoiser from loaded DiT weights. ``time_embedding`` ``auto`` (or None) is what the DiT file records,
    else ``bf16`` (see ``e2p_core.time_embedding``); ``memory_mode`` says how the DiT's weights are held (see
    ``backends.memory``). GGUF-quantised weights are dequantised on load unless the mode is ``gguf``."""
    variant = resolve_time_embedding(time_embedding, dit.time_embedding)
    mode = check_memory_mode(memory_mode)
    device = torch.device(device)
    state_dict_bfl = dit.state_dict_bfl
    quantized = any(_is_gguf_quantized(value) for value in state_dict_bfl.values())
    if quantized or mode == "gguf":
        from . import gguf

        if mode == "gguf":
            state_dict = gguf.bfl_to_diffusers_quantized(state_dict_bfl if quantized
                                                         else gguf.quantize_state_dict(state_dict_bfl, device))
        else:
            state_dict = bfl_to_diffusers(gguf.dequantize_state_dict(state_dict_bfl, dtype))
    else:
        state_dict = bfl_to_diffusers(state_dict_bfl)
    build_device = torch.device("cpu") if builds_on_host(mode) else device
    transformer = build_transformer(state_dict, dit.architecture, dtype, build_device, variant)
    if builds_on_host(mode):
        place_transformer(transformer, mode, dtype, device)
    return DiffusersDenoiser(transformer, dtype, device)


def load_diffusers_codec(vae: VAEWeights, dtype: torch.dtype = torch.bfloat16,
                         device: torch.device | str = "cpu") -> DiffusersCodec:
    return DiffusersCodec(build_vae(vae.state_dict_diffusers, vae.architecture, dtype, torch.device(device)))


def speed_up(
    denoiser: DiffusersDenoiser,
    codec: DiffusersCodec,
    *,
    compile_mode: str | None = None,
    attention_backend: str | None = None,
    channels_last_vae: bool = False,
) -> None:
    """Optional speed-ups for GPUs, in place. Off by default: the eager path is the reference the parity tests pin.

    * ``compile_mode``: ``torch.compile`` the DiT and the VAE encoder/decoder (``"default"``, ``"max-autotune"``, or
      ``"reduce-overhead"`` for CUDA graphs; the first call per image size compiles);
    * ``attention_backend``: a diffusers attention backend for the DiT (``"native"`` = PyTorch SDPA, the default
      kernel choice; ``"_native_flash"``, ``"_native_cudnn"``, ``"flash"`` with flash-attn installed, ...);
    * ``channels_last_vae``: NHWC memory format for the VAE's convolutions (faster cuDNN kernels on tensor cores).

    Results agree with the eager path to the dtype's rounding (kernels sum in other orders), not bit for bit.
    """
    if attention_backend:
        denoiser.transformer.set_attention_backend(attention_backend)
    if channels_last_vae:
        codec.vae.to(memory_format=torch.channels_last)
    if compile_mode:
        import torch._inductor.config as inductor_config

        # Fused pointwise chains would otherwise stay in float32 between ops that eager rounds to bf16.
        inductor_config.emulate_precision_casts = True
        for module in (denoiser.transformer, codec.vae.encoder, codec.vae.decoder):
            module.compile(mode=compile_mode, fullgraph=False, dynamic=False)
