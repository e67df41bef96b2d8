"""The task prompt without a manual step: without ``--prompt-embeds``, ``predict`` reads the prompt cache, else encodes
the prompt once with the text encoders on disk (a ComfyUI install's, an fp8 T5 included) or fetched from the (fake)
hub with the real client, caches it and frees the encoders. A cached prompt needs no encoder and no network.

The hub serves tiny CLIP-L / T5 as ComfyUI single files under the table's names (``clip_l.safetensors``,
``t5xxl_fp16.safetensors``), ComfyUI's copies of the real tokenizers as FLUX's ``tokenizer{,_2}/``, and the tiny
parity DiT/VAE/LoRA (tests/hub_support). The tiny encoders have the parity DiT's widths (32), so the prompt they encode
drives a real ``predict`` run.
"""

import copy
import shutil
import weakref

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfy_support import comfy_root
from conftest import FIXTURES, load_run
from e2p_core import cli_models, text_encoders
from e2p_core.cli import build_parser, main
from e2p_core.cli_tasks import task_runs
from e2p_core.errors import HubError
from e2p_core.hub import MODEL_FILES, TOKENIZER_KEYS
from e2p_core.prompts import PromptEmbeddings, load_prompt_embeddings, save_prompt_embeddings
from e2p_core.tasks import TASKS
from hub_support import FakeHub, serve_tokenizers, tiny_model_hub
from text_encoder_support import (TinyComfyEncoders, build_tiny_comfy_encoders, comfy_t5_state, count_encoder_loads,
                                  reference_ids)

DEPTH = TASKS["depth"].prompt
TOKEN = "hf_granted"
ENCODER_FILES = {"clip_l.safetensors", "t5xxl_fp16.safetensors"}
TOKENIZER_FILES = {key.split("/", 1)[1] for keys in TOKENIZER_KEYS.values() for key in keys}


@pytest.fixture(scope="session")
def encoders(tmp_path_factory) -> TinyComfyEncoders:
    """Tiny encoders as wide as the parity DiT's text inputs (T5 32, CLIP pooled 32)."""
    return build_tiny_comfy_encoders(tmp_path_factory.mktemp("ComfyUI"), clip_width=32, t5_width=32)


@pytest.fixture
def hub(monkeypatch, tmp_path, encoders):
    with tiny_model_hub(monkeypatch, tmp_path / "hf_home", TOKEN) as fake:
        serve_tokenizers(fake, comfy_root())
        for key in ("clip_l", "t5xxl_fp16"):
            fake.add_file(MODEL_FILES[key].hub.repo, MODEL_FILES[key].hub.path, encoders.folder / MODEL_FILES[key].name)
        monkeypatch.setattr(text_encoders, "running_comfyui_root", lambda: None)  # as outside ComfyUI
        yield fake


@pytest.fixture
def encoder_loads(monkeypatch) -> list[weakref.ref]:
    return count_encoder_loads(monkeypatch)


def downloaded_names(hub: FakeHub) -> set[str]:
    return {request.path.rsplit("/", 1)[1] for request in hub.downloads()}


def predict_args(tmp_path, dit_config_file, *extra: str) -> list[str]:
    noise = tmp_path / "noise.safetensors"
    save_file({"noise": load_run("depth_1step_lora_fp32")["noise"].float().contiguous()}, noise)
    return ["predict", "--task", "depth", "--image", str(FIXTURES / "input.png"), "--out", str(tmp_path / "depth.png"),
            "--raw", str(tmp_path / "raw.safetensors"), "--dit-config", str(dit_config_file), "--noise", str(noise),
            "--resolution", "native", "--dtype", "fp32", "--device", "cpu", "--time-embedding", "reference",
            "--cache-dir", str(tmp_path / "prompt_cache"), *extra]


def prompt_args(tmp_path, *extra: str):
    """The options of predict's one depth run, as ``predict`` hands them to ``prompt_embeddings``."""
    (run,) = task_runs(build_parser().parse_args(["predict", "--task", "depth", "--image", "x.png", "--out", "x.png",
                                                  "--cache-dir", str(tmp_path / "prompt_cache"), *extra]))
    return run


def test_zero_config_predict_encodes_the_prompt_once_then_runs_from_the_cache(
    hub, tmp_path, dit_config_file, encoders, encoder_loads
):
    args = predict_args(tmp_path, dit_config_file)
    assert main(args) == 0
    assert ENCODER_FILES | TOKENIZER_FILES <= downloaded_names(hub)
    assert len(encoder_loads) == 2 and all(ref() is None for ref in encoder_loads)  # CLIP and T5 once, both freed
    zero_config = load_file(tmp_path / "raw.safetensors")

    # The same run with the prompt given as a file: the tiny encoders' outputs for the hand-derived token ids.
    expected = tmp_path / "expected_prompt.safetensors"
    save_prompt_embeddings(PromptEmbeddings(*encoders.expected(DEPTH), DEPTH), expected)
    assert main(predict_args(tmp_path, dit_config_file, "--prompt-embeds", str(expected))) == 0
    with_file = load_file(tmp_path / "raw.safetensors")
    for stage in ("velocity", "latent", "output"):
        torch.testing.assert_close(zero_config[stage], with_file[stage], rtol=0, atol=1e-5)

    hub.requests.clear()
    assert main(args) == 0
    assert hub.requests == [] and len(encoder_loads) == 2  # second run: no GET, no HEAD, no encoder


def test_a_cached_prompt_needs_neither_the_encoders_nor_the_network(hub, tmp_path, monkeypatch, encoder_loads):
    first = cli_models.prompt_embeddings(prompt_args(tmp_path), torch.device("cpu"), torch.float32)
    assert len(encoder_loads) == 2
    shutil.rmtree(tmp_path / "hf_home")  # the downloaded encoders are gone
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.requests.clear()
    again = cli_models.prompt_embeddings(prompt_args(tmp_path), torch.device("cpu"), torch.float32)
    assert torch.equal(again.prompt_embeds, first.prompt_embeds) and hub.requests == [] and len(encoder_loads) == 2

    with pytest.raises(HubError, match=r"(?s)clip_l\.safetensors .*comfyanonymous/flux_text_encoders.*t5xxl_fp16"):
        cli_models.prompt_embeddings(prompt_args(tmp_path, "--cache-dir",
                                                 str(tmp_path / "empty_cache")), torch.device("cpu"), torch.float32)


def _comfyui_install(tmp_path, encoders: TinyComfyEncoders, t5_file: str, t5_state, tokenizers: bool):
    root = tmp_path / "ComfyUI"
    folder = root / "models" / "text_encoders"
    folder.mkdir(parents=True)
    shutil.copy(encoders.folder / "clip_l.safetensors", folder)
    save_file(t5_state, str(folder / t5_file))
    if tokenizers:
        shutil.copytree(encoders.root / "comfy", root / "comfy")
    return root


def test_a_comfyui_install_with_an_fp8_t5_is_used_as_it_is(hub, tmp_path, encoders, encoder_loads):
    fp8_state = {key: value.to(torch.float8_e4m3fn) if value.ndim == 2 else value
                 for key, value in comfy_t5_state(encoders.t5).items()}
    root = _comfyui_install(tmp_path, encoders, "t5xxl_fp8_e4m3fn.safetensors", fp8_state, tokenizers=True)
    embeddings = cli_models.prompt_embeddings(prompt_args(tmp_path, "--comfyui", str(root)), torch.device("cpu"),
                                              torch.float32)
    assert hub.requests == [] and len(encoder_loads) == 2

    fp8_t5 = copy.deepcopy(encoders.t5)  # what the fp8 file holds, computed independently of the loader
    with torch.no_grad():
        for parameter in fp8_t5.parameters():
            if parameter.ndim == 2:
                parameter.copy_(parameter.to(torch.float8_e4m3fn).float())
        expected = fp8_t5(input_ids=torch.tensor([reference_ids(DEPTH).t5])).last_hidden_state
    torch.testing.assert_close(embeddings.prompt_embeds, expected, rtol=0, atol=1e-5)


def test_a_comfyui_install_without_tokenizers_gets_only_them_from_the_hub(hub, tmp_path, encoders, encoder_loads):
    root = _comfyui_install(tmp_path, encoders, "t5xxl_fp16.safetensors", comfy_t5_state(encoders.t5),
                            tokenizers=False)
    args = prompt_args(tmp_path, "--comfyui", str(root))
    first = cli_models.prompt_embeddings(args, torch.device("cpu"), torch.float32)
    assert downloaded_names(hub) == TOKENIZER_FILES
    assert (root / "models" / "text_encoders" / "flux_tokenizers" / "tokenizer_2" / "tokenizer.json").is_file()
    expected_embeds, expected_pooled = encoders.expected(DEPTH)
    torch.testing.assert_close(first.prompt_embeds, expected_embeds, rtol=0, atol=1e-5)
    torch.testing.assert_close(first.pooled_prompt_embeds, expected_pooled, rtol=0, atol=1e-5)

    hub.requests.clear()
    second = cli_models.prompt_embeddings(args, torch.device("cpu"), torch.float32)  # now complete on disk: same entry
    assert hub.requests == [] and len(encoder_loads) == 2 and torch.equal(second.prompt_embeds, first.prompt_embeds)


def test_embed_prompts_without_text_encoders_fetches_them_into_comfyui(hub, tmp_path, encoders):
    comfyui = tmp_path / "ComfyUI"
    out_dir = comfyui / "models" / "e2p_prompts"
    assert main(["embed-prompts", "--comfyui", str(comfyui), "--out-dir", str(out_dir), "--task", "depth"]) == 0
    assert ENCODER_FILES | TOKENIZER_FILES <= downloaded_names(hub)
    assert (comfyui / "models" / "text_encoders" / "t5xxl_fp16.safetensors").is_file()
    written = load_prompt_embeddings(out_dir / "depth.safetensors")
    expected_embeds, expected_pooled = encoders.expected(DEPTH)
    torch.testing.assert_close(written.prompt_embeds, expected_embeds, rtol=0, atol=1e-5)
    torch.testing.assert_close(written.pooled_prompt_embeds, expected_pooled, rtol=0, atol=1e-5)
