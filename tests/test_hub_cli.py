"""The command line without model paths: ``predict`` takes its weights from disk or the (fake) hub and reproduces the
official run; ``download`` pre-fetches into ComfyUI's folders; explicit paths never touch the network.

The hub serves the tiny parity weights under the real repository names (tests/hub_support); ``--dit-config`` is
given because the tiny DiT is not FLUX-sized (its RoPE axes), exactly as for explicit paths.
"""

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FIXTURES, load_run
from e2p_core.cli import main
from hub_support import tiny_model_hub
from test_parity import assert_stages

TOKEN = "hf_granted"
RUN_OF_WEIGHTS = {"lora": "depth_1step_lora_fp32", "full": "depth_1step_fp32"}


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with tiny_model_hub(monkeypatch, tmp_path / "hf_home", TOKEN) as fake:
        yield fake


def predict_args(tmp_path, prompt_files, dit_config_file, run_name: str) -> list[str]:
    noise = tmp_path / "noise.safetensors"
    save_file({"noise": load_run(run_name)["noise"].float().contiguous()}, noise)
    return ["predict", "--task", "depth", "--image", str(FIXTURES / "input.png"), "--out", str(tmp_path / "depth.png"),
            "--raw", str(tmp_path / "raw.safetensors"), "--dit-config", str(dit_config_file),
            "--prompt-embeds", str(prompt_files["depth"]), "--noise", str(noise), "--resolution", "native",
            "--dtype", "fp32", "--device", "cpu", "--time-embedding", "reference"]


@pytest.mark.parametrize("weights", sorted(RUN_OF_WEIGHTS))
def test_zero_config_predict_downloads_then_runs_from_disk(hub, tmp_path, prompt_files, dit_config_file, weights):
    args = [*predict_args(tmp_path, prompt_files, dit_config_file, RUN_OF_WEIGHTS[weights]), "--weights", weights]
    assert main(args) == 0
    expected = {"lora": ["flux1-kontext-dev.safetensors", "depth_lora.safetensors", "ae.safetensors"],
                "full": ["depth.safetensors", "ae.safetensors"]}[weights]
    assert sorted(r.path.rsplit("/", 1)[1] for r in hub.downloads()) == sorted(expected)
    assert_stages(load_file(tmp_path / "raw.safetensors"), load_run(RUN_OF_WEIGHTS[weights]), "depth",
                  torch.float32)
    hub.requests.clear()
    assert main(args) == 0
    assert hub.requests == []  # the second run: no GET, no HEAD


def test_explicit_paths_never_touch_the_network(hub, tmp_path, prompt_files, dit_config_file):
    args = [*predict_args(tmp_path, prompt_files, dit_config_file, "depth_1step_lora_fp32"),
            "--dit", str(FIXTURES / "dit_bfl.safetensors"), "--lora", str(FIXTURES / "lora_kohya.safetensors"),
            "--vae", str(FIXTURES / "vae_bfl.safetensors")]
    assert main(args) == 0
    assert hub.requests == []


def test_download_into_comfyui_then_predict_offline(hub, tmp_path, prompt_files, dit_config_file, monkeypatch,
                                                    capsys):
    comfyui = tmp_path / "ComfyUI"
    assert main(["download", "--task", "depth", "--comfyui", str(comfyui), "--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert "flux1-kontext-dev.safetensors" in listing and "to download, 23.8 GB" in listing
    assert "t5xxl_fp16.safetensors" in listing and "flux_tokenizers/tokenizer_2/tokenizer.json" in listing
    assert hub.downloads() == []
    assert main(["download", "--task", "depth", "--comfyui", str(comfyui), "--no-text-encoders"]) == 0
    models = comfyui / "models"
    for path in ("diffusion_models/flux1-kontext-dev.safetensors", "loras/depth_lora.safetensors",
                 "vae/ae.safetensors"):
        assert (models / path).is_file()
    hub.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = [*predict_args(tmp_path, prompt_files, dit_config_file, "depth_1step_lora_fp32"), "--comfyui", str(comfyui)]
    assert main(args) == 0
    assert_stages(load_file(tmp_path / "raw.safetensors"), load_run("depth_1step_lora_fp32"), "depth",
                  torch.float32)
    assert hub.requests == []


def test_predict_offline_with_nothing_on_disk_names_the_files(hub, tmp_path, prompt_files, dit_config_file,
                                                              monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(predict_args(tmp_path, prompt_files, dit_config_file, "depth_1step_lora_fp32")) == 2
    message = capsys.readouterr().err
    for name in ("flux1-kontext-dev.safetensors", "depth_lora.safetensors", "ae.safetensors"):
        assert name in message
    assert not (tmp_path / "depth.png").exists() and hub.requests == []
