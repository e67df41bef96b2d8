"""Tests of e2p_core.text_encoders: the real tokenizers feed the reference token ids, ComfyUI single-file CLIP-L / T5
(fp16, fp8, scaled fp8) load through the shape-derived configs, and the prompt cache runs the encoders once.

The tokenizers are the REAL ones ComfyUI ships (``comfy/sd1_tokenizer``, ``comfy/text_encoders/t5_tokenizer`` of the
ComfyUI 0.3.75 tree that tests/e2e/install.sh installs). The expected ids are derived here without transformers or
tokenizers: OpenAI CLIP's byte-pair merges read from ``vocab.json`` + ``merges.txt``, and T5's unigram segmentation
(the highest total score) read from ``tokenizer.json``. The tiny encoders are written in ComfyUI's single-file naming
and checked against the in-memory transformers models they were saved from.
"""

import json
import math
import shutil
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from e2p_core import prompts, text_encoders
from e2p_core.errors import CheckpointError, E2PError
from e2p_core.prompts import CLIP_MAX_LENGTH, T5_MAX_LENGTH, cached_prompt_embeddings, tokenize
from e2p_core.tasks import TASKS
from e2p_core.text_encoders import (
    EncoderFiles,
    clip_config,
    find_text_encoders,
    load_single_file,
    load_tokenizer,
    t5_config,
)
from tests.comfy_support import comfy_root

COMFY_CLIP_TOKENIZER = comfy_root() / "comfy" / "sd1_tokenizer"
COMFY_T5_TOKENIZER = comfy_root() / "comfy" / "text_encoders" / "t5_tokenizer"
DEPTH = TASKS["depth"].prompt


# --------------------------------------------------------------------------------- reference tokenization, by hand


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


def test_the_hand_derivation_reads_the_vocabularies_as_expected() -> None:
    # Hand-checked: every word of the depth prompt is one CLIP token; T5 splits "Transform" into "▁Trans" "form".
    assert clip_bpe_tokens(DEPTH) == [word.lower() + "</w>" for word in DEPTH.split()]
    assert t5_unigram_pieces(DEPTH) == ["▁Trans", "form", *("▁" + word for word in DEPTH.split()[1:])]
    ids = reference_ids(DEPTH)
    assert ids.clip[:1] == [49406] and ids.clip[9:] == [49407] * 68  # <|startoftext|>, then <|endoftext|> x 68
    assert ids.t5[9:11] == [1, 0] and ids.t5[11:] == [0] * 501  # </s>, then <pad>


@pytest.mark.parametrize("task", sorted(TASKS))
def test_real_tokenizers_give_the_reference_ids_for_each_task_prompt(task: str) -> None:
    prompt = TASKS[task].prompt
    expected = reference_ids(prompt)
    clip_ids = tokenize(load_tokenizer(COMFY_CLIP_TOKENIZER), prompt, CLIP_MAX_LENGTH)
    t5_ids = tokenize(load_tokenizer(COMFY_T5_TOKENIZER), prompt, T5_MAX_LENGTH)
    assert clip_ids.shape == (1, 77) and t5_ids.shape == (1, 512)
    assert clip_ids[0].tolist() == expected.clip
    assert t5_ids[0].tolist() == expected.t5


def test_real_tokenizers_truncate_a_long_prompt_keeping_the_end_tokens() -> None:
    long_prompt = " ".join([DEPTH] * 80)  # 640 words
    clip_ids = tokenize(load_tokenizer(COMFY_CLIP_TOKENIZER), long_prompt, CLIP_MAX_LENGTH)[0].tolist()
    t5_ids = tokenize(load_tokenizer(COMFY_T5_TOKENIZER), long_prompt, T5_MAX_LENGTH)[0].tolist()
    assert clip_ids == reference_ids(long_prompt).clip[:76] + [49407]
    assert t5_ids == reference_ids(long_prompt).t5[:511] + [1]


# ------------------------------------------------------------------------------------------ configs from shapes


def test_config_of_the_real_clip_l_shapes_is_clip_l() -> None:
    from transformers import CLIPTextConfig

    shapes = {"embeddings.token_embedding.weight": (49408, 768), "embeddings.position_embedding.weight": (77, 768),
              **{f"encoder.layers.{i}.mlp.fc1.weight": (3072, 768) for i in range(12)}}
    config = CLIPTextConfig(**clip_config(shapes))
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size,
            config.vocab_size, config.max_position_embeddings) == (768, 12, 12, 3072, 49408, 77)
    assert config.hidden_act == "quick_gelu" and config.layer_norm_eps == 1e-5


def test_config_of_the_real_t5_xxl_shapes_is_t5_xxl() -> None:
    from transformers import T5Config

    shapes = {"shared.weight": (32128, 4096),
              "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (32, 64),
              "encoder.block.0.layer.0.SelfAttention.q.weight": (4096, 4096),
              **{f"encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight": (10240, 4096) for i in range(24)}}
    config = T5Config(**t5_config(shapes))
    assert (config.d_model, config.num_layers, config.num_heads, config.d_kv, config.d_ff, config.vocab_size) == (
        4096, 24, 64, 64, 10240, 32128)
    assert config.is_gated_act and config.dense_act_fn == "gelu_new" and config.layer_norm_epsilon == 1e-6
    assert (config.relative_attention_num_buckets, config.relative_attention_max_distance) == (32, 128)


def test_a_t5_without_the_gated_feed_forward_is_refused() -> None:
    with pytest.raises(CheckpointError, match="not a T5 v1.1 encoder"):
        t5_config({"shared.weight": (100, 8), "encoder.block.0.layer.1.DenseReluDense.wi.weight": (16, 8)}, "old.st")


# ------------------------------------------------------------------------------ tiny encoders as ComfyUI files


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


def _comfy_t5_state(t5: torch.nn.Module) -> dict[str, torch.Tensor]:
    """ComfyUI's t5xxl_fp16.safetensors naming: ``shared.weight`` once, ``encoder.*``."""
    return {key: value.half() for key, value in t5.state_dict().items() if key != "encoder.embed_tokens.weight"}


@pytest.fixture(scope="session")
def comfy_encoders(tmp_path_factory: pytest.TempPathFactory) -> TinyComfyEncoders:
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    root = tmp_path_factory.mktemp("ComfyUI")
    for kind, tokenizer in (("clip", COMFY_CLIP_TOKENIZER), ("t5", COMFY_T5_TOKENIZER)):
        shutil.copytree(tokenizer, root / text_encoders.COMFY_TOKENIZER_DIRS[kind])
    folder = root / "models" / "text_encoders"
    folder.mkdir(parents=True)
    torch.manual_seed(0)  # CLIP with the real vocabulary, 2 heads of 64, 2 layers
    clip = _fp16_rounded(CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=128, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407)))
    save_file(_comfy_clip_state(clip), str(folder / "clip_l.safetensors"))
    torch.manual_seed(1)  # T5 v1.1 with the real vocabulary, 4 heads of 8, 2 blocks
    t5 = _fp16_rounded(T5EncoderModel(T5Config(
        vocab_size=32128, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2, feed_forward_proj="gated-gelu")))
    save_file(_comfy_t5_state(t5), str(folder / "t5xxl_fp16.safetensors"))
    return TinyComfyEncoders(root, clip, t5)


def test_a_comfyui_root_finds_the_single_files_and_comfyuis_tokenizers(comfy_encoders: TinyComfyEncoders) -> None:
    for location in (comfy_encoders.root, comfy_encoders.folder):
        found = find_text_encoders(location)
        assert found.clip == EncoderFiles(comfy_encoders.folder / "clip_l.safetensors",
                                          comfy_encoders.root / "comfy" / "sd1_tokenizer")
        assert found.t5 == EncoderFiles(comfy_encoders.folder / "t5xxl_fp16.safetensors",
                                        comfy_encoders.root / "comfy" / "text_encoders" / "t5_tokenizer")


@pytest.mark.parametrize("kind", ["clip", "t5"])
def test_single_files_load_to_the_models_they_were_saved_from(comfy_encoders: TinyComfyEncoders, kind: str) -> None:
    found = find_text_encoders(comfy_encoders.folder)
    files = found.clip if kind == "clip" else found.t5
    loaded = load_single_file(files.weights, kind, torch.float32, load_tokenizer(files.tokenizer))
    original = comfy_encoders.clip if kind == "clip" else comfy_encoders.t5
    assert type(loaded) is type(original)
    loaded_state, original_state = loaded.state_dict(), original.state_dict()
    assert sorted(loaded_state) == sorted(original_state)
    for key, value in original_state.items():
        assert torch.equal(loaded_state[key], value), key
    assert all(param.device.type == "cpu" for param in loaded.parameters())  # nothing left on the meta device


def test_fp8_and_scaled_fp8_t5_files_dequantise(comfy_encoders: TinyComfyEncoders, tmp_path: Path) -> None:
    state = _comfy_t5_state(comfy_encoders.t5)
    linear = "encoder.block.0.layer.0.SelfAttention.q.weight"
    plain = {key: value.to(torch.float8_e4m3fn) if value.ndim == 2 else value for key, value in state.items()}
    scaled = dict(plain, **{linear: (state[linear].float() / 0.01).to(torch.float8_e4m3fn),
                            linear.replace(".weight", ".scale_weight"): torch.tensor(0.01),
                            "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)})
    tokenizer = load_tokenizer(COMFY_T5_TOKENIZER)
    for name, tensors in (("t5xxl_fp8_e4m3fn.safetensors", plain), ("t5xxl_fp8_e4m3fn_scaled.safetensors", scaled)):
        save_file(tensors, str(tmp_path / name))
        loaded = load_single_file(tmp_path / name, "t5", torch.bfloat16, tokenizer).state_dict()
        assert loaded["shared.weight"].dtype == torch.bfloat16
        assert torch.equal(loaded["shared.weight"], plain["shared.weight"].to(torch.bfloat16))
        stored = tensors[linear].float() * (0.01 if "scaled" in name else 1.0)
        assert torch.equal(loaded[linear], stored.to(torch.bfloat16)), name


def test_t5_file_preference_and_the_flux_tokenizers_beside_the_files(tmp_path: Path) -> None:
    folder = tmp_path / "text_encoders"
    (folder / "flux_tokenizers" / "tokenizer").mkdir(parents=True)
    (folder / "flux_tokenizers" / "tokenizer_2").mkdir()
    for name in ("clip_l.safetensors", "t5xxl_fp8_e4m3fn.safetensors", "t5xxl_fp8_e4m3fn_scaled.safetensors"):
        (folder / name).write_bytes(b"x")
    found = find_text_encoders(folder)
    assert found.t5 == EncoderFiles(folder / "t5xxl_fp8_e4m3fn_scaled.safetensors",
                                    folder / "flux_tokenizers" / "tokenizer_2")
    assert found.clip.tokenizer == folder / "flux_tokenizers" / "tokenizer"
    (folder / "t5xxl_fp16.safetensors").write_bytes(b"x")
    assert find_text_encoders(folder).t5.weights == folder / "t5xxl_fp16.safetensors"


def test_finding_errors_name_what_is_missing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(text_encoders, "running_comfyui_root", lambda: None)
    with pytest.raises(CheckpointError, match="nowhere does not exist.*clip_l.safetensors.*download"):
        find_text_encoders(tmp_path / "nowhere")
    (tmp_path / "text_encoder").mkdir()
    with pytest.raises(CheckpointError, match=r"lacks the subfolders \['tokenizer', 'text_encoder_2', 'tokenizer_2'\]"):
        find_text_encoders(tmp_path)
    folder = tmp_path / "models" / "text_encoders"
    folder.mkdir(parents=True)
    (folder / "clip_l.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"no text encoders found in .*text_encoders \(it holds \['clip_l"):
        find_text_encoders(folder)
    (folder / "t5xxl_fp16.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="no CLIP tokenizer .*flux_tokenizers/tokenizer .*comfy/sd1_tokenizer"):
        find_text_encoders(folder)


def test_missing_transformers_names_the_text_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # what `import transformers` sees when not installed
    with pytest.raises(E2PError, match=r"pip install -e \.\[text\]"):
        load_tokenizer(COMFY_CLIP_TOKENIZER)


# -------------------------------------------------------------------------------------- the whole automatic path


def test_comfyui_files_are_encoded_once_freed_then_read_from_the_cache(
    comfy_encoders: TinyComfyEncoders, tmp_path: Path, monkeypatch
) -> None:
    loads: list[weakref.ref] = []
    real_load = prompts.load_encoder

    def counting_load(files, kind, dtype):
        tokenizer, model = real_load(files, kind, dtype)
        loads.append(weakref.ref(model))
        return tokenizer, model

    monkeypatch.setattr(prompts, "load_encoder", counting_load)
    cache = tmp_path / "cache"
    first = cached_prompt_embeddings(DEPTH, comfy_encoders.root, cache)
    expected_embeds, expected_pooled = comfy_encoders.expected(DEPTH)
    torch.testing.assert_close(first.prompt_embeds, expected_embeds, rtol=0, atol=1e-5)
    torch.testing.assert_close(first.pooled_prompt_embeds, expected_pooled, rtol=0, atol=1e-5)
    assert len(loads) == 2 and all(ref() is None for ref in loads)  # CLIP and T5 loaded once each, both freed
    assert len(list(cache.iterdir())) == 1  # one entry, no temporary file left

    second = cached_prompt_embeddings(DEPTH, comfy_encoders.root, cache)
    assert len(loads) == 2  # no encoder touched
    assert torch.equal(second.prompt_embeds, first.prompt_embeds)
    assert torch.equal(second.pooled_prompt_embeds, first.pooled_prompt_embeds)


def test_embed_prompts_reads_a_comfyui_folder(comfy_encoders: TinyComfyEncoders, tmp_path: Path) -> None:
    from e2p_core.cli import main
    from e2p_core.prompts import load_prompt_embeddings

    assert main(["embed-prompts", "--text-encoders", str(comfy_encoders.root), "--out-dir", str(tmp_path),
                 "--task", "normal"]) == 0
    written = load_prompt_embeddings(tmp_path / "normal.safetensors")
    expected_embeds, expected_pooled = comfy_encoders.expected(TASKS["normal"].prompt)
    torch.testing.assert_close(written.prompt_embeds, expected_embeds, rtol=0, atol=1e-5)
    torch.testing.assert_close(written.pooled_prompt_embeds, expected_pooled, rtol=0, atol=1e-5)
