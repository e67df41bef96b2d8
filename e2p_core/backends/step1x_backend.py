"""FE2E on the diffusers backend: Step1X-Edit = diffusers' ``FluxTransformer2DModel`` (no guidance embedder, the
pooled projection fed by the connector) + Step1X's ``Qwen2Connector`` (``e2p_core.connector``).

Step1X-Edit's blocks are BFL Flux blocks, so the Edit2Perceive key maps and :class:`ReferenceFluxTransformer` host
them unchanged; what differs is set here: the timestep sinusoid uses exact float32 frequencies of ``1000 * t``
(``t`` in the compute dtype), the q/k RMSNorm computes in float32 and rounds once (Liger's "gemma" mode), and the
text tokens and pooled vector come from the connector at every call. The VAE always runs in float32, as the
reference keeps it.
"""

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

from ..connector import PromptCache, Qwen2Connector, build_connector
from ..weights import Step1XWeights, VAEWeights
from .diffusers_backend import DiffusersCodec, ReferenceFluxTransformer, bfl_to_diffusers, build_transformer, build_vae

VAE_DTYPE = torch.float32  # the reference casts the autoencoder to float32 whatever the DiT's dtype


class Step1XTransformer(ReferenceFluxTransformer):
    """The Step1X-Edit DiT: Flux blocks whose gated MLP residual (double blocks) and block residual (single
    blocks) are ``x * gate + residual`` rounded ONCE (the reference's compiled ``scale_add_residual``); the double
    blocks' attention residual rounds twice, like eager PyTorch. Identical to diffusers' blocks in float32."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.set_attn_processor(Step1XAttnProcessor())

    def run_block(self, block, hidden_states, encoder_hidden_states, temb, rotary):
        if isinstance(block, FluxTransformerBlock):
            return _double_block(block, hidden_states, encoder_hidden_states, temb, rotary)
        return _single_block(block, hidden_states, encoder_hidden_states, temb, rotary)


def fused_residual(x: torch.Tensor, gate: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``x * gate[:, None] + residual`` in float32, rounded once to ``residual``'s dtype."""
    return (x.float() * gate.unsqueeze(1).float() + residual.float()).to(residual.dtype)


class Step1XAttnProcessor:
    """diffusers' ``FluxAttnProcessor`` without its ``.contiguous()`` before the output projections: the reference
    projects the strided text/image slices of the attention output, and a bf16 GEMM on a strided input rounds
    differently on CPU."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        def heads(x):  # [B,S,H*D] -> [B,S,H,D]
            return x.unflatten(-1, (-1, attn.head_dim))

        query, key, value = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(
            attn.to_v(hidden_states))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if encoder_hidden_states is not None:  # double block: text first, as in the joint attention
            text_query = attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states)))
            text_key = attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states)))
            query = torch.cat([text_query, query], dim=1)
            key = torch.cat([text_key, key], dim=1)
            value = torch.cat([heads(attn.add_v_proj(encoder_hidden_states)), value], dim=1)
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
        out = out.transpose(1, 2).flatten(2, 3)  # [B,S,H*D]
        if encoder_hidden_states is None:
            return out
        text_length = encoder_hidden_states.shape[1]
        return attn.to_out[0](out[:, text_length:]), attn.to_add_out(out[:, :text_length])


def _double_block(block: FluxTransformerBlock, image, text, temb, rotary):
    image_normed, image_gate_attn, image_shift_mlp, image_scale_mlp, image_gate_mlp = block.norm1(image, emb=temb)
    text_normed, text_gate_attn, text_shift_mlp, text_scale_mlp, text_gate_mlp = block.norm1_context(text, emb=temb)
    image_attn, text_attn = block.attn(hidden_states=image_normed, encoder_hidden_states=text_normed,
                                       image_rotary_emb=rotary)[:2]

    image = image + image_gate_attn.unsqueeze(1) * image_attn
    image_mlp_in = block.norm2(image) * (1 + image_scale_mlp[:, None]) + image_shift_mlp[:, None]
    image = fused_residual(block.ff(image_mlp_in), image_gate_mlp, image)

    text = text + text_gate_attn.unsqueeze(1) * text_attn
    text_mlp_in = block.norm2_context(text) * (1 + text_scale_mlp[:, None]) + text_shift_mlp[:, None]
    text = fused_residual(block.ff_context(text_mlp_in), text_gate_mlp, text)
    return text, image


def _single_block(block: FluxSingleTransformerBlock, image, text, temb, rotary):
    text_length = text.shape[1]
    stream = torch.cat([text, image], dim=1)  # [B,L+N,hidden]
    normed, gate = block.norm(stream, emb=temb)
    mlp = block.act_mlp(block.proj_mlp(normed))
    attention = block.attn(hidden_states=normed, image_rotary_emb=rotary)
    stream = fused_residual(block.proj_out(torch.cat([attention, mlp], dim=2)), gate, stream)
    return stream[:, :text_length], stream[:, text_length:]


class Step1XDenoiser:
    """:class:`e2p_core.backends.base.Denoiser` for FE2E: ``prompt`` is the :class:`PromptCache` (float32)."""

    def __init__(self, transformer: ReferenceFluxTransformer, connector: Qwen2Connector, dtype: torch.dtype,
                 device: torch.device | str):
        self.transformer = transformer
        self.connector = connector
        self.dtype = dtype
        self.device = torch.device(device)

    def text_conditioning(self, cache: PromptCache, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(txt [B,L,hidden], pooled [B,vec]) for ``timestep`` [B] (1000 * t, compute dtype)."""
        batch = timestep.shape[0]
        return self.connector(cache.embeds.repeat(batch, 1, 1), timestep, cache.mask.repeat(batch, 1))

    def __call__(self, tokens, ids, timestep, guidance, prompt: PromptCache) -> torch.Tensor:
        text, pooled = self.text_conditioning(prompt, timestep)  # [B,L,hidden], [B,vec]
        text_ids = torch.zeros(text.shape[1], 3, dtype=ids.dtype, device=ids.device)
        return self.transformer(hidden_states=tokens, encoder_hidden_states=text, pooled_projections=pooled,
                                timestep=timestep, img_ids=ids, txt_ids=text_ids, guidance=None)  # [B,N,64]


def load_step1x_backend(
    weights: Step1XWeights, vae: VAEWeights, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu"
) -> tuple[Step1XDenoiser, DiffusersCodec]:
    device = torch.device(device)
    transformer = build_transformer(bfl_to_diffusers(weights.dit.state_dict_bfl), weights.dit.architecture, dtype,
                                    device, time_embedding="exact", qk_norm="float32",
                                    model_class=Step1XTransformer)
    connector = build_connector(weights.connector_state_dict, weights.connector_architecture, dtype, device)
    codec = DiffusersCodec(build_vae(vae.state_dict_diffusers, vae.architecture, VAE_DTYPE, device))
    return Step1XDenoiser(transformer, connector, dtype, device), codec
