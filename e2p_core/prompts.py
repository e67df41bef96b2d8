"""Text conditioning of the DiT: the task prompt encoded by CLIP-L and T5-XXL, and its on-disk form.

Edit2Perceive is conditioned on one fixed caption per task (``tasks.TASKS``), encoded as FLUX does it (E2P-SPEC §1.2):

* CLIP-L: tokens padded/truncated to 77; the pooled vector is ``CLIPTextModel.pooler_output`` (the final-layer-norm
  hidden state at the EOS position) -> ``pooled_prompt_embeds`` [1, P] (P = 768 for FLUX).
* T5-XXL: tokens padded/truncated to 512; ``last_hidden_state`` with no attention mask, so the padding positions are
  part of the conditioning exactly as in training -> ``prompt_embeds`` [1, L, D] (L = 512, D = 4096 for FLUX).
* ``text_ids`` are zeros [L, 3].

Because the prompt never changes, the ~10 GB T5 has to run once per prompt only: the result is stored in a small
safetensors file (format ``e2p-prompt-embeds-v1``):

* tensors: exactly ``prompt_embeds`` [1, L, D] and ``pooled_prompt_embeds`` [1, P], floating point, finite;
* metadata: ``format`` = ``e2p-prompt-embeds-v1`` and ``prompt`` = the encoded text (both optional when loading).

This module must stay importable without ``transformers`` (ComfyUI imports it with every node): ``transformers`` is
imported only when an encoder is actually loaded.
"""

import gc
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import safetensors
import torch

from .checkpoints.io import save_safetensors_atomic
from .errors import CheckpointError, E2PError, InputError
from .text_encoders import (
    EncoderFiles,
    EncoderKind,
    EncoderSource,
    TextEncoders,
    find_text_encoders,
    load_encoder,
    local_encoder_source,
)

if TYPE_CHECKING:  # for the annotations only: importing transformers at run time is deferred to the encoders
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

FORMAT = "e2p-prompt-embeds-v1"
CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512

_TENSOR_KEYS = ("prompt_embeds", "pooled_prompt_embeds")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class PromptEmbeddings:
    prompt_embeds: torch.Tensor  # [1, L, D] T5 last hidden state
    pooled_prompt_embeds: torch.Tensor  # [1, P] CLIP pooled output
    prompt: str | None = None

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "PromptEmbeddings":
        return PromptEmbeddings(
            self.prompt_embeds.to(device=device, dtype=dtype),
            self.pooled_prompt_embeds.to(device=device, dtype=dtype),
            self.prompt,
        )

    @property
    def text_ids(self) -> torch.Tensor:
        """Position ids [L, 3] of the text tokens: all zero (text has no image position)."""
        seq_len = self.prompt_embeds.shape[1]
        return torch.zeros(seq_len, 3, device=self.prompt_embeds.device, dtype=self.prompt_embeds.dtype)


# ---------------------------------------------------------------------------------------------------------- files


def load_prompt_embeddings(path: str | Path) -> PromptEmbeddings:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"prompt embeddings file {path.name!r} not found in {path.parent}{_folder_listing(path)}")
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            keys = sorted(handle.keys())
            metadata = handle.metadata() or {}
    except (OSError, safetensors.SafetensorError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None
    if not set(_TENSOR_KEYS) <= set(keys):
        raise CheckpointError(
            f"{path}: a prompt embeddings file holds the tensors {list(_TENSOR_KEYS)}; this one has {keys}"
        )
    if len(keys) > len(_TENSOR_KEYS):  # e.g. text_ids, which are always zero anyway
        logger.info("%s: ignoring the extra tensors %s", path, sorted(set(keys) - set(_TENSOR_KEYS)))
    if metadata.get("format", FORMAT) != FORMAT:
        raise CheckpointError(f"{path}: format {metadata['format']!r} is not {FORMAT!r}")
    with safetensors.safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in _TENSOR_KEYS}
    _check_tensors(tensors["prompt_embeds"], tensors["pooled_prompt_embeds"], str(path), CheckpointError)
    return PromptEmbeddings(tensors["prompt_embeds"], tensors["pooled_prompt_embeds"], metadata.get("prompt"))


def save_prompt_embeddings(embeddings: PromptEmbeddings, path: str | Path) -> None:
    """Write ``embeddings`` to ``path`` atomically: a reader never sees a half-written file."""
    _check_tensors(embeddings.prompt_embeds, embeddings.pooled_prompt_embeds, "prompt embeddings to save", InputError)
    tensors = {key: getattr(embeddings, key).detach().to("cpu") for key in _TENSOR_KEYS}
    metadata = {"format": FORMAT}
    if embeddings.prompt is not None:
        metadata["prompt"] = embeddings.prompt
    save_safetensors_atomic(tensors, path, metadata)


def _check_tensors(
    prompt_embeds: torch.Tensor, pooled_prompt_embeds: torch.Tensor, source: str, error: type[E2PError]
) -> None:
    for name, tensor, rank, layout in (
        ("prompt_embeds", prompt_embeds, 3, "[1, L, D]"),
        ("pooled_prompt_embeds", pooled_prompt_embeds, 2, "[1, P]"),
    ):
        if tensor.dtype not in _FLOAT_DTYPES:
            raise error(f"{source}: {name} has dtype {tensor.dtype}; expected a floating point tensor {layout}")
        if tensor.ndim != rank or tensor.shape[0] != 1 or tensor.numel() == 0:
            raise error(f"{source}: {name} has shape {list(tensor.shape)}; expected {layout} (one prompt)")
        if not torch.isfinite(tensor).all():
            raise error(f"{source}: {name} contains NaN or infinite values")


def _folder_listing(path: Path) -> str:
    if not path.parent.is_dir():
        return " (that folder does not exist)"
    present = sorted(entry.name for entry in path.parent.glob("*.safetensors"))
    return f"; safetensors files there: {present}" if present else "; there are no safetensors files there"


# ------------------------------------------------------------------------------------------------------- encoding


def encode_prompts(
    prompts: list[str],
    text_encoders: str | Path | TextEncoders,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> list[PromptEmbeddings]:
    """Encode each prompt with CLIP-L and T5 (a folder as ``find_text_encoders`` reads it, or the files found);
    the encoders are freed on return.

    The encoders run one after the other (never both in memory), each prompt on its own, so a prompt gets the same
    embeddings whatever else is in the list.
    """
    if not isinstance(prompts, list) or not all(isinstance(prompt, str) for prompt in prompts):
        raise InputError(f"prompts must be a list of strings; got {prompts!r}")
    encoders = text_encoders if isinstance(text_encoders, TextEncoders) else find_text_encoders(text_encoders)
    if not prompts:
        return []
    # CLIP-L: the pooled vector (the final-layer-norm state at the end token), each [1, P].
    pooled_per_prompt = _run_encoder(encoders.clip, "clip", CLIP_MAX_LENGTH, "pooler_output", prompts, device, dtype)
    # T5: the last hidden state of all 512 tokens, each [1, 512, D]. No attention mask: FLUX attends to the padding
    # tokens too, in T5 and in the DiT.
    embeds_per_prompt = _run_encoder(encoders.t5, "t5", T5_MAX_LENGTH, "last_hidden_state", prompts, device, dtype)
    return [
        PromptEmbeddings(embeds, pooled, prompt)
        for prompt, embeds, pooled in zip(prompts, embeds_per_prompt, pooled_per_prompt, strict=True)
    ]


def _run_encoder(
    files: EncoderFiles, kind: EncoderKind, max_length: int, output: str, prompts: list[str],
    device: torch.device | str, dtype: torch.dtype,
) -> list[torch.Tensor]:
    """``output`` of one text encoder for each prompt, padded/truncated to ``max_length`` tokens."""
    tokenizer, model = load_encoder(files, kind, dtype)
    model.to(device)
    outputs = []
    with torch.no_grad():
        for prompt in prompts:
            token_ids = tokenize(tokenizer, prompt, max_length).to(device)  # [1, max_length]
            outputs.append(getattr(model(input_ids=token_ids), output))
    # The last reference: the weights are freed before the next encoder is loaded (gc breaks any module cycles).
    del model
    gc.collect()
    _release_cached_memory(device)
    return outputs


def tokenize(tokenizer: "PreTrainedTokenizerBase", prompt: str, max_length: int) -> torch.Tensor:
    """[1, max_length] token ids as the reference feeds them: specials added, truncated, padded to ``max_length``."""
    encoded = tokenizer([prompt], max_length=max_length, padding="max_length", truncation=True, return_tensors="pt")
    return encoded.input_ids


def _release_cached_memory(device: torch.device | str) -> None:
    # Hand the freed encoder weights back to the driver so that the DiT (or ComfyUI's allocator) can use them.
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------- cache


def cached_prompt_embeddings(
    prompt: str,
    text_encoders: str | Path | EncoderSource,
    cache_dir: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> PromptEmbeddings:
    """The embeddings of ``prompt``, encoded once and then read from ``cache_dir`` without loading any encoder.

    An entry is keyed by the prompt, the dtype the encoders ran in, the format version and the identity of the
    encoders (for a folder: its files' names, sizes and modification times, so replacing the encoders re-encodes;
    moving the folder does not).
    """
    if not isinstance(prompt, str):
        raise InputError(f"prompt must be a string; got {prompt!r}")
    source = text_encoders if isinstance(text_encoders, EncoderSource) else local_encoder_source(text_encoders)
    cache_file = Path(cache_dir) / f"{_cache_key(prompt, source.identity, dtype)}.safetensors"
    if cache_file.is_file():
        cached = load_prompt_embeddings(cache_file)
        if cached.prompt == prompt:  # guards against a hand-copied file under a colliding name
            return cached.to(device, dtype)
    logger.info("encoding the prompt %r with the text encoders of %s (once: the result is cached in %s)", prompt,
                source.description, cache_file.parent)
    (embeddings,) = encode_prompts([prompt], source.locate(), device, dtype)
    save_prompt_embeddings(embeddings, cache_file)
    return embeddings


def _cache_key(prompt: str, encoder_identity: list, dtype: torch.dtype) -> str:
    identity = {"format": FORMAT, "prompt": prompt, "dtype": str(dtype), "encoders": encoder_identity}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()[:32]
