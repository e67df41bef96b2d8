"""Test support for the text encoders: the token ids the official pipeline feeds, derived by hand from the REAL
tokenizer files ComfyUI ships, and tiny CLIP-L / T5 encoders written as ComfyUI single files.

The expected ids are derived without transformers or tokenizers: OpenAI CLIP's byte-pair merges read from
``vocab.json`` + ``merges.txt``, and T5's unigram segmentation (the highest total score) read from ``tokenizer.json``
of ComfyUI's ``comfy/sd1_tokenizer`` and ``comfy/text_encoders/t5_tokenizer`` (installed by tests/e2e/install.sh).
"""

import json
import math
import shutil
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from comfy_support import comfy_root
from e2p_core import prompts
from e2p_core.text_encoders import COMFY_TOKENIZER_DIRS

COMFY_CLIP_TOKENIZER = comfy_root() / COMFY_TOKENIZER_DIRS["clip"]
COMFY_T5_TOKENIZER = comfy_root() / COMFY_TOKENIZER_DIRS["t5"]



def clip_bpe_tokens(prompt: str) -> list[str]:
    """OpenAI CLIP's BPE: lower-cased words, the last character marked ``</w>``, lowest-rank merges first."""
    lines = (COMFY_CLIP_TOKENIZER / "merges.txt").read_text(encoding="utf-8").splitlines()
    ranks = {tuple(line.split()): rank for rank, line in enumerate(lines[1:])}  # line 0 is "#version: ..."
    tokens = []
    for word in prompt.lower().split():
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = [(ranks.get(pair, math.inf), index) for index, pair in enumerate(zip(parts, parts[1:]))]
            rank, index = min(pairs)
            if rank == math.inf:
                break
            parts[index:index + 2] = [parts[index] + parts[index + 1]]
        tokens += parts
    return tokens


def t5_unigram_pieces(prompt: str) -> list[str]:
    """SentencePiece unigram: each word with its "▁" prefix split into the pieces of highest total log-probability."""
    vocab = json.loads((COMFY_T5_TOKENIZER / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    scores = {piece: score for piece, score in vocab}
    pieces = []
    for word in ("▁" + word for word in prompt.split()):
        best = [(0.0, [])] + [(-math.inf, [])] * len(word)  # best[i]: (score, pieces) of word[:i]
        for end in range(1, len(word) + 1):
            for start in range(end):
                piece = word[start:end]
                if piece in scores and best[start][0] + scores[piece] > best[end][0]:
                    best[end] = (best[start][0] + scores[piece], best[start][1] + [piece])
        pieces += best[-1][1]
    return pieces


@dataclass
class ReferenceIds:
    clip: list[int]  # 77
    t5: list[int]  # 512


def reference_ids(prompt: str) -> ReferenceIds:
    """The ids the official pipeline feeds (E2P-SPEC §1.2): CLIP <start> tokens <end>, padded to 77 with <end> (FLUX's
    CLIP pad token); T5 tokens </s>, padded to 512 with <pad>."""
    clip_vocab = json.loads((COMFY_CLIP_TOKENIZER / "vocab.json").read_text(encoding="utf-8"))
    start, end = clip_vocab["<|startoftext|>"], clip_vocab["<|endoftext|>"]
    clip = [start, *(clip_vocab[token] for token in clip_bpe_tokens(prompt)), end]
    t5_vocab = {piece: index for index, (piece, _) in enumerate(
        json.loads((COMFY_T5_TOKENIZER / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"])}
    t5 = [*(t5_vocab[piece] for piece in t5_unigram_pieces(prompt)), t5_vocab["</s>"]]
    return ReferenceIds(clip + [end] * (77 - len(clip)), t5 + [t5_vocab["<pad>"]] * (512 - len(t5)))


# ------------------------------------------------------------------------------------------ tiny ComfyUI encoders


@dataclass
class TinyComfyEncoders:
    root: Path  # a ComfyUI checkout: comfy/<tokenizers>, models/text_encoders/<files>
    clip: torch.nn.Module
    t5: torch.nn.Module

    @property
    def folder(self) -> Path:
        return self.root / "models" / "text_encoders"

    def expected(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds [1, 512, D], pooled [1, P]) from the reference ids and the in-memory models."""
        ids = reference_ids(prompt)
        with torch.no_grad():
            clip_hidden = self.clip(input_ids=torch.tensor([ids.clip])).last_hidden_state  # [1, 77, P]
            t5_hidden = self.t5(input_ids=torch.tensor([ids.t5])).last_hidden_state  # [1, 512, D]
        return t5_hidden, clip_hidden[:, ids.clip.index(49407)]  # pooled at the first <|endoftext|>


def _fp16_rounded(model: torch.nn.Module) -> torch.nn.Module:
    """The model with the weights a fp16 file holds (what it computes after loading in fp32)."""
    return model.half().float().eval()


def _comfy_clip_state(clip: torch.nn.Module) -> dict[str, torch.Tensor]:
    """ComfyUI's clip_l.safetensors naming: ``text_model.*`` plus the (unused) projection and logit scale."""
    state = {"text_model." + key.removeprefix("text_model."): value.half() for key, value in clip.state_dict().items()
             if "position_ids" not in key}
    hidden = clip.config.hidden_size
    return {**state, "text_projection.weight": torch.eye(hidden).half(), "logit_scale": torch.tensor(4.6052)}


def comfy_t5_state(t5: torch.nn.Module) -> dict[str, torch.Tensor]:
    """ComfyUI's t5xxl_fp16.safetensors naming: ``shared.weight`` once, ``encoder.*``."""
    return {key: value.half() for key, value in t5.state_dict().items() if key != "encoder.embed_tokens.weight"}


def build_tiny_comfy_encoders(root: Path, clip_width: int, t5_width: int) -> TinyComfyEncoders:
    """A ComfyUI checkout in ``root`` with tiny encoders in models/text_encoders (the real vocabularies; CLIP with
    64-wide heads as CLIP-L, T5 with 8-wide heads) and ComfyUI's tokenizers copied into comfy/."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    for kind, tokenizer in (("clip", COMFY_CLIP_TOKENIZER), ("t5", COMFY_T5_TOKENIZER)):
        shutil.copytree(tokenizer, root / COMFY_TOKENIZER_DIRS[kind])
    folder = root / "models" / "text_encoders"
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    clip = _fp16_rounded(CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=clip_width, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=max(1, clip_width // 64),
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407)))
    save_file(_comfy_clip_state(clip), str(folder / "clip_l.safetensors"))
    torch.manual_seed(1)
    t5 = _fp16_rounded(T5EncoderModel(T5Config(
        vocab_size=32128, d_model=t5_width, d_kv=8, num_heads=4, d_ff=48, num_layers=2,
        feed_forward_proj="gated-gelu")))
    save_file(comfy_t5_state(t5), str(folder / "t5xxl_fp16.safetensors"))
    return TinyComfyEncoders(root, clip, t5)


def count_encoder_loads(monkeypatch) -> list[weakref.ref]:
    """A weak reference to every text encoder model the prompt encoding loads from now on (to count the loads and
    to check that each model is freed)."""
    loads = []
    real_load = prompts.load_encoder

    def counting_load(files, kind, dtype):
        tokenizer, model = real_load(files, kind, dtype)
        loads.append(weakref.ref(model))
        return tokenizer, model

    monkeypatch.setattr(prompts, "load_encoder", counting_load)
    return loads
