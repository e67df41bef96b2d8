"""Tests of e2p_core.prompts on tiny, locally built CLIP-L / T5 stand-ins in the diffusers FLUX folder layout.

The expected embeddings are computed here independently: tokens by hand (whitespace words -> WordLevel ids, specials,
truncation, padding), then the in-memory models called directly, the CLIP pooled vector read at the first EOS.
"""

import gc
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from e2p_core import prompts as prompts_module
from e2p_core.checkpoints import io as checkpoint_io
from e2p_core.errors import CheckpointError, InputError
from e2p_core.prompts import (
    PromptEmbeddings,
    cached_prompt_embeddings,
    encode_prompts,
    load_prompt_embeddings,
    save_prompt_embeddings,
)
from e2p_core.tasks import MATTING_PROMPT_INFERENCE_PY, TASKS

REPO = Path(__file__).resolve().parents[1]
HIDDEN = 32  # D of the tiny T5 and P of the tiny CLIP
DEPTH, NORMAL = TASKS["depth"].prompt, TASKS["normal"].prompt
# The tiny vocabularies: every word of the task prompts; any other word is unknown.
WORDS = sorted({word for prompt in [*(task.prompt for task in TASKS.values()), MATTING_PROMPT_INFERENCE_PY]
                for word in prompt.split()})


@dataclass
class TinyTokenizerRules:
    vocab: dict[str, int]
    bos_id: int | None  # CLIP prepends a start token, T5 does not
    eos_id: int
    pad_id: int
    unk_id: int

    def token_ids(self, prompt: str, max_length: int) -> torch.Tensor:
        """[1, max_length]: words -> ids, truncated so that the specials fit, EOS appended, then padded."""
        word_ids = [self.vocab.get(word, self.unk_id) for word in prompt.split()]
        prefix = [] if self.bos_id is None else [self.bos_id]
        ids = prefix + word_ids[: max_length - len(prefix) - 1] + [self.eos_id]
        return torch.tensor([ids + [self.pad_id] * (max_length - len(ids))])


@dataclass
class TinyEncoders:
    folder: Path
    clip: torch.nn.Module
    t5: torch.nn.Module
    clip_rules: TinyTokenizerRules
    t5_rules: TinyTokenizerRules

    def expected(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds [1, 512, 32], pooled [1, 32]) computed without the code under test."""
        clip_ids = self.clip_rules.token_ids(prompt, 77)
        t5_ids = self.t5_rules.token_ids(prompt, 512)
        with torch.no_grad():
            clip_hidden = self.clip(input_ids=clip_ids).last_hidden_state  # [1, 77, 32], after the final layer norm
            first_eos = int((clip_ids[0] == self.clip_rules.eos_id).nonzero()[0])
            t5_hidden = self.t5(input_ids=t5_ids).last_hidden_state  # [1, 512, 32]
        return t5_hidden, clip_hidden[:, first_eos]


def _save_word_level_tokenizer(folder: Path, vocab: dict[str, int], template: str, specials: dict[str, str]) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=specials["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    template_specials = [(token, vocab[token]) for token in sorted(set(specials.values())) if token in template]
    tokenizer.post_processor = processors.TemplateProcessing(single=template, special_tokens=template_specials)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, **specials).save_pretrained(folder)


@pytest.fixture(scope="session")
def encoders(tmp_path_factory: pytest.TempPathFactory) -> TinyEncoders:
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    folder = tmp_path_factory.mktemp("flux_text_encoders")

    # CLIP as in FLUX: the end token is the highest id and doubles as the padding token.
    clip_vocab = {token: index for index, token in enumerate([*WORDS, "<unk>", "<|startoftext|>", "<|endoftext|>"])}
    clip_rules = TinyTokenizerRules(
        clip_vocab, clip_vocab["<|startoftext|>"], clip_vocab["<|endoftext|>"], clip_vocab["<|endoftext|>"],
        clip_vocab["<unk>"],
    )
    _save_word_level_tokenizer(
        folder / "tokenizer", clip_vocab, "<|startoftext|> $A <|endoftext|>",
        {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
         "unk_token": "<unk>"},
    )
    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=100, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=77, projection_dim=HIDDEN, bos_token_id=clip_rules.bos_id,
        eos_token_id=clip_rules.eos_id, pad_token_id=clip_rules.pad_id,
    )).eval()
    clip.save_pretrained(folder / "text_encoder")

    # T5 as in FLUX: pad 0, eos 1, unk 2, an end token but no start token.
    t5_vocab = {token: index for index, token in enumerate(["<pad>", "</s>", "<unk>", *WORDS])}
    t5_rules = TinyTokenizerRules(t5_vocab, None, t5_vocab["</s>"], t5_vocab["<pad>"], t5_vocab["<unk>"])
    _save_word_level_tokenizer(
        folder / "tokenizer_2", t5_vocab, "$A </s>", {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    )
    torch.manual_seed(1)
    t5 = T5EncoderModel(T5Config(
        vocab_size=100, d_model=HIDDEN, num_layers=2, num_heads=2, d_kv=16, d_ff=37, feed_forward_proj="gated-gelu",
        pad_token_id=t5_rules.pad_id, eos_token_id=t5_rules.eos_id, decoder_start_token_id=t5_rules.pad_id,
    )).eval()
    t5.save_pretrained(folder / "text_encoder_2")
    return TinyEncoders(folder, clip, t5, clip_rules, t5_rules)


@pytest.fixture
def encoder_copy(encoders: TinyEncoders, tmp_path: Path) -> Path:
    """A private copy of the encoder folder that a test may rename, touch or corrupt."""
    return Path(shutil.copytree(encoders.folder, tmp_path / "encoders"))


def _embeddings(prompt: str | None = "a prompt", seq_len: int = 4) -> PromptEmbeddings:
    generator = torch.Generator().manual_seed(3)
    return PromptEmbeddings(
        torch.randn(1, seq_len, HIDDEN, generator=generator), torch.randn(1, HIDDEN, generator=generator), prompt
    )


# ---------------------------------------------------------------------------------------------------------- import


def test_import_does_not_pull_transformers_or_diffusers() -> None:
    check = "import e2p_core.prompts, sys; assert not {'transformers', 'diffusers'} & set(sys.modules), sys.modules"
    result = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


# -------------------------------------------------------------------------------------------------------- encoding


def test_encode_prompts_shapes_and_text_ids(encoders: TinyEncoders) -> None:
    (embeddings,) = encode_prompts([DEPTH], encoders.folder)
    assert embeddings.prompt == DEPTH
    assert embeddings.prompt_embeds.shape == (1, 512, HIDDEN)
    assert embeddings.pooled_prompt_embeds.shape == (1, HIDDEN)
    assert embeddings.prompt_embeds.dtype == embeddings.pooled_prompt_embeds.dtype == torch.float32
    assert embeddings.text_ids.shape == (512, 3)
    assert embeddings.text_ids.dtype == torch.float32 and not embeddings.text_ids.any()


def test_encode_prompts_equals_direct_model_calls(encoders: TinyEncoders) -> None:
    long_prompt = " ".join([*DEPTH.split(), "unknownword"] * 80)  # 720 words: truncated by both tokenizers
    prompts = [DEPTH, "Transform to unknownword map", long_prompt, MATTING_PROMPT_INFERENCE_PY]
    for prompt, embeddings in zip(prompts, encode_prompts(prompts, str(encoders.folder)), strict=True):
        expected_embeds, expected_pooled = encoders.expected(prompt)
        torch.testing.assert_close(embeddings.prompt_embeds, expected_embeds, rtol=0, atol=1e-6)
        torch.testing.assert_close(embeddings.pooled_prompt_embeds, expected_pooled, rtol=0, atol=1e-6)


def test_no_encoder_stays_in_memory_after_encoding(encoders: TinyEncoders) -> None:
    from transformers import CLIPTextModel, T5EncoderModel

    def alive() -> set[int]:  # type(): no proxies
        gc.collect()
        return {id(obj) for obj in gc.get_objects() if type(obj) in (CLIPTextModel, T5EncoderModel)}

    before = alive()  # the fixtures' own models (this module's and any other test module's)
    encode_prompts([DEPTH], encoders.folder)
    assert alive() == before and {id(encoders.clip), id(encoders.t5)} <= before


def test_different_prompts_give_different_embeddings(encoders: TinyEncoders) -> None:
    depth, normal = encode_prompts([DEPTH, NORMAL], encoders.folder)
    assert (depth.prompt_embeds - normal.prompt_embeds).abs().max() > 1e-3
    assert (depth.pooled_prompt_embeds - normal.pooled_prompt_embeds).abs().max() > 1e-3


def test_encode_prompts_in_bfloat16_and_empty_list(encoders: TinyEncoders) -> None:
    (bf16,) = encode_prompts([DEPTH], encoders.folder, dtype=torch.bfloat16)
    expected_embeds, expected_pooled = encoders.expected(DEPTH)
    assert bf16.prompt_embeds.dtype == bf16.pooled_prompt_embeds.dtype == bf16.text_ids.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.prompt_embeds.float(), expected_embeds, rtol=0.05, atol=0.1)
    torch.testing.assert_close(bf16.pooled_prompt_embeds.float(), expected_pooled, rtol=0.05, atol=0.1)
    assert encode_prompts([], encoders.folder) == []


def test_to_moves_both_tensors_and_keeps_the_prompt() -> None:
    moved = _embeddings().to("cpu", torch.float16)
    assert moved.prompt_embeds.dtype == moved.pooled_prompt_embeds.dtype == moved.text_ids.dtype == torch.float16
    assert moved.prompt == "a prompt"


# ----------------------------------------------------------------------------------------------------------- files


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prompt", ["Transform to depth map", None])
def test_save_load_round_trip_is_exact(tmp_path: Path, dtype: torch.dtype, prompt: str | None) -> None:
    original = _embeddings(prompt).to("cpu", dtype)
    path = tmp_path / "depth.safetensors"
    save_prompt_embeddings(original, path)
    loaded = load_prompt_embeddings(path)
    assert torch.equal(loaded.prompt_embeds, original.prompt_embeds)
    assert torch.equal(loaded.pooled_prompt_embeds, original.pooled_prompt_embeds)
    assert loaded.prompt_embeds.dtype == dtype and loaded.prompt == prompt
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["format"] == "e2p-prompt-embeds-v1"
    assert os.listdir(tmp_path) == ["depth.safetensors"]  # no temporary file left behind


def test_interrupted_save_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "depth.safetensors"
    save_prompt_embeddings(_embeddings("old"), path)

    def write_half_then_fail(tensors, filename, metadata=None) -> None:
        Path(filename).write_bytes(b"half a header")
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint_io, "save_file", write_half_then_fail)
    with pytest.raises(CheckpointError, match="No space"):
        save_prompt_embeddings(_embeddings("new"), path)
    assert os.listdir(tmp_path) == ["depth.safetensors"]
    assert load_prompt_embeddings(path).prompt == "old"


def test_save_refuses_invalid_embeddings(tmp_path: Path) -> None:
    broken = _embeddings()
    broken.pooled_prompt_embeds[0, 0] = float("nan")
    with pytest.raises(InputError, match="pooled_prompt_embeds contains NaN"):
        save_prompt_embeddings(broken, tmp_path / "broken.safetensors")
    assert not any(tmp_path.iterdir())


def test_load_missing_file_names_it_and_its_folder(tmp_path: Path) -> None:
    save_prompt_embeddings(_embeddings(), tmp_path / "normal.safetensors")
    with pytest.raises(CheckpointError, match=r"'depth.safetensors' not found in .*normal\.safetensors"):
        load_prompt_embeddings(tmp_path / "depth.safetensors")
    with pytest.raises(CheckpointError, match="'depth.safetensors' not found in .*does not exist"):
        load_prompt_embeddings(tmp_path / "nowhere" / "depth.safetensors")


def _good_tensors() -> dict[str, torch.Tensor]:
    embeddings = _embeddings()
    return {"prompt_embeds": embeddings.prompt_embeds, "pooled_prompt_embeds": embeddings.pooled_prompt_embeds}


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"prompt_embeds": torch.zeros(1, 4, 8)}, r"holds the tensors .* has \['prompt_embeds'\]"),
        ({**_good_tensors(), "prompt_embeds": torch.full((1, 4, 8), float("nan"))}, "prompt_embeds contains NaN"),
        ({**_good_tensors(), "pooled_prompt_embeds": torch.full((1, 8), float("inf"))}, "pooled_prompt_embeds .* inf"),
        ({**_good_tensors(), "prompt_embeds": torch.zeros(4, 8)}, r"prompt_embeds has shape \[4, 8\]; expected \[1, L"),
        ({**_good_tensors(), "prompt_embeds": torch.zeros(2, 4, 8)}, r"shape \[2, 4, 8\]; expected \[1, L, D\]"),
        ({**_good_tensors(), "pooled_prompt_embeds": torch.zeros(1, 1, 8)}, r"shape \[1, 1, 8\]; expected \[1, P\]"),
        ({**_good_tensors(), "pooled_prompt_embeds": torch.zeros(1, 8, dtype=torch.int64)}, "dtype torch.int64"),
    ],
    ids=["missing_key", "nan", "inf", "rank", "batch", "pooled_rank", "integer"],
)
def test_load_rejects_bad_contents(tmp_path: Path, tensors: dict[str, torch.Tensor], message: str) -> None:
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=message) as raised:
        load_prompt_embeddings(path)
    assert "bad.safetensors" in str(raised.value)


def test_load_ignores_extra_tensors(tmp_path: Path) -> None:
    path = tmp_path / "with_text_ids.safetensors"
    save_file({**_good_tensors(), "text_ids": torch.zeros(4, 3)}, str(path))
    loaded = load_prompt_embeddings(path)
    assert torch.equal(loaded.prompt_embeds, _good_tensors()["prompt_embeds"])


def test_load_rejects_a_non_safetensors_file_and_another_format(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00not a safetensors file at all")
    with pytest.raises(CheckpointError, match="garbage.safetensors: not a readable safetensors file"):
        load_prompt_embeddings(garbage)
    future = tmp_path / "future.safetensors"
    save_file(_good_tensors(), str(future), metadata={"format": "e2p-prompt-embeds-v2"})
    with pytest.raises(CheckpointError, match="'e2p-prompt-embeds-v2' is not 'e2p-prompt-embeds-v1'"):
        load_prompt_embeddings(future)


# ------------------------------------------------------------------------------------------------- encoder folder


def test_missing_subfolder_names_the_folder_and_the_expected_layout(encoder_copy: Path, tmp_path: Path) -> None:
    shutil.rmtree(encoder_copy / "tokenizer_2")
    with pytest.raises(CheckpointError, match=r"encoders lacks the subfolders \['tokenizer_2'\].*'text_encoder_2'"):
        encode_prompts([DEPTH], encoder_copy)
    with pytest.raises(CheckpointError, match="tokenizer_2"):
        cached_prompt_embeddings(DEPTH, encoder_copy, tmp_path / "cache")
    with pytest.raises(CheckpointError, match="nowhere does not exist.*FLUX.1-Kontext-dev"):
        encode_prompts([DEPTH], tmp_path / "nowhere")


def test_encode_prompts_rejects_a_bare_string(encoders: TinyEncoders) -> None:
    with pytest.raises(InputError, match="list of strings"):
        encode_prompts(DEPTH, encoders.folder)


# ----------------------------------------------------------------------------------------------------------- cache


def _count_encodings(monkeypatch) -> list[list[str]]:
    calls: list[list[str]] = []
    real_encode = prompts_module.encode_prompts

    def counting_encode(prompts, *args, **kwargs):
        calls.append(list(prompts))
        return real_encode(prompts, *args, **kwargs)

    monkeypatch.setattr(prompts_module, "encode_prompts", counting_encode)
    return calls


def test_cache_hit_loads_no_encoder(encoders: TinyEncoders, encoder_copy: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = cached_prompt_embeddings(DEPTH, encoder_copy, cache)
    expected_embeds, expected_pooled = encoders.expected(DEPTH)
    torch.testing.assert_close(first.prompt_embeds, expected_embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(first.pooled_prompt_embeds, expected_pooled, rtol=0, atol=1e-6)

    # Garble every weight file (same size and mtime, so the cache key is unchanged) and move the folder: any
    # encoder load would now fail, so an equal result can only come from the cache.
    for weights in encoder_copy.rglob("*.safetensors"):
        stat = weights.stat()
        weights.write_bytes(b"\xff" * stat.st_size)
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    moved = encoder_copy.rename(tmp_path / "moved_encoders")
    with pytest.raises(CheckpointError, match="cannot load a CLIPTextModel from .*text_encoder"):  # garbling is real
        encode_prompts([DEPTH], moved)
    hit = cached_prompt_embeddings(DEPTH, moved, cache, dtype=torch.float32)
    assert torch.equal(hit.prompt_embeds, first.prompt_embeds)
    assert torch.equal(hit.pooled_prompt_embeds, first.pooled_prompt_embeds)
    assert hit.prompt == DEPTH


def test_cache_misses_on_a_new_prompt_dtype_or_encoder_files(
    encoders: TinyEncoders, encoder_copy: Path, tmp_path: Path, monkeypatch
) -> None:
    calls = _count_encodings(monkeypatch)
    cache = tmp_path / "cache"
    cached_prompt_embeddings(DEPTH, encoder_copy, cache)
    cached_prompt_embeddings(DEPTH, encoder_copy, cache)
    assert calls == [[DEPTH]]

    normal = cached_prompt_embeddings(NORMAL, encoder_copy, cache)
    assert calls == [[DEPTH], [NORMAL]]
    torch.testing.assert_close(normal.prompt_embeds, encoders.expected(NORMAL)[0], rtol=0, atol=1e-6)

    bf16 = cached_prompt_embeddings(DEPTH, encoder_copy, cache, dtype=torch.bfloat16)
    assert calls[-1] == [DEPTH] and len(calls) == 3
    assert bf16.prompt_embeds.dtype == bf16.pooled_prompt_embeds.dtype == torch.bfloat16

    t5_weights = encoder_copy / "text_encoder_2" / "model.safetensors"
    os.utime(t5_weights, ns=(t5_weights.stat().st_atime_ns, t5_weights.stat().st_mtime_ns + 10**9))
    cached_prompt_embeddings(DEPTH, encoder_copy, cache)
    assert len(calls) == 4
    assert len(list(cache.glob("*.safetensors"))) == 4 and len(list(cache.iterdir())) == 4



def test_cache_hit_is_moved_to_the_requested_device(encoder_copy: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cached_prompt_embeddings(DEPTH, encoder_copy, cache)
    # "meta" stands in for an accelerator: the encoders could not run there, so only a cache hit can return it.
    hit = cached_prompt_embeddings(DEPTH, encoder_copy, cache, device="meta")
    assert hit.prompt_embeds.device.type == hit.pooled_prompt_embeds.device.type == hit.text_ids.device.type == "meta"


def test_embed_prompts_cli_writes_one_file_per_task(encoders: TinyEncoders, tmp_path: Path) -> None:
    from e2p_core.cli import main

    assert main(["embed-prompts", "--text-encoders", str(encoders.folder), "--out-dir", str(tmp_path),
                 "--task", "depth", "matting", "--matting-prompt", "inference_py"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["depth.safetensors", "matting.safetensors"]
    for task, prompt in (("depth", DEPTH), ("matting", MATTING_PROMPT_INFERENCE_PY)):
        loaded = load_prompt_embeddings(tmp_path / f"{task}.safetensors")
        expected_t5, expected_pooled = encoders.expected(prompt)
        assert loaded.prompt == prompt
        torch.testing.assert_close(loaded.prompt_embeds, expected_t5)
        torch.testing.assert_close(loaded.pooled_prompt_embeds, expected_pooled)


def test_predict_encodes_its_prompt_once_through_the_cache(encoders: TinyEncoders, tmp_path: Path, monkeypatch) -> None:
    """``predict --text-encoders`` with a cache dir: the second run reads the cache (T5 is loaded once, ever)."""
    from e2p_core import cli, cli_models
    from e2p_core.cli_tasks import task_runs

    calls = _count_encodings(monkeypatch)
    (args,) = task_runs(cli.build_parser().parse_args([
        "predict", "--task", "normal", "--dit", "x", "--vae", "y", "--image", "z", "--out", "o.png",
        "--text-encoders", str(encoders.folder), "--cache-dir", str(tmp_path), "--dtype", "fp32", "--device", "cpu"]))
    first = cli_models.prompt_embeddings(args, torch.device("cpu"), torch.float32)
    second = cli_models.prompt_embeddings(args, torch.device("cpu"), torch.float32)
    assert len(calls) == 1 and calls[0] == [NORMAL]
    torch.testing.assert_close(first.prompt_embeds, second.prompt_embeds, rtol=0, atol=0)
