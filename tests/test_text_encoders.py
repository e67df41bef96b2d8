"""Tests of e2p_core.text_encoders: the real tokenizers feed the reference token ids, ComfyUI single-file CLIP-L / T5
(fp16, fp8, scaled fp8) load through the shape-derived configs, and the prompt cache runs the encoders once.

The tokenizers are the REAL ones ComfyUI ships; the expected ids are derived by hand (tests/text_encoder_support). The
tiny encoders are written in ComfyUI's single-file naming and checked against the in-memory transformers models they
were saved from.
"""

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from e2p_core import text_encoders
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
from text_encoder_support import (
    COMFY_CLIP_TOKENIZER,
    COMFY_T5_TOKENIZER,
    TinyComfyEncoders,
    build_tiny_comfy_encoders,
    clip_bpe_tokens,
    comfy_t5_state,
    count_encoder_loads,
    reference_ids,
    t5_unigram_pieces,
)

DEPTH = TASKS["depth"].prompt


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


@pytest.fixture(scope="session")
def comfy_encoders(tmp_path_factory: pytest.TempPathFactory) -> TinyComfyEncoders:
    return build_tiny_comfy_encoders(tmp_path_factory.mktemp("ComfyUI"), clip_width=128, t5_width=32)


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
    state = comfy_t5_state(comfy_encoders.t5)
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


def test_missing_transformers_says_how_to_install_it(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # what `import transformers` sees when not installed
    with pytest.raises(E2PError, match=r"needs transformers.*pip install transformers"):
        load_tokenizer(COMFY_CLIP_TOKENIZER)


# -------------------------------------------------------------------------------------- the whole automatic path


def test_comfyui_files_are_encoded_once_freed_then_read_from_the_cache(
    comfy_encoders: TinyComfyEncoders, tmp_path: Path, monkeypatch
) -> None:
    loads = count_encoder_loads(monkeypatch)
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


def test_inside_comfyui_the_single_files_take_comfyuis_tokenizers(tmp_path: Path, monkeypatch) -> None:
    from comfy_support import comfy_root

    monkeypatch.setattr(sys, "path", [*sys.path, str(comfy_root())])  # what ComfyUI's main.py makes importable
    assert text_encoders.running_comfyui_root() == comfy_root()
    for name in ("clip_l.safetensors", "t5xxl_fp16.safetensors"):
        (tmp_path / name).write_bytes(b"x")
    found = find_text_encoders(tmp_path)
    assert (found.clip.tokenizer, found.t5.tokenizer) == (COMFY_CLIP_TOKENIZER, COMFY_T5_TOKENIZER)
