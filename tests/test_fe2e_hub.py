"""FE2E without model paths: Step1X-Edit's checkpoint and VAE and FE2E's LoRA come from the sources table (the fake
hub serves the tiny parity weights under the real repository names) and reproduce the official run."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from e2p_core.cli import main
from e2p_core.hub import MODEL_FILES
from fe2e_support import DIT, DIT_CONFIG, IMAGE, LORA, PROMPT_CACHE, VAE, VAE_CONFIG, load_run
from hub_support import FakeHub, hub_environment
from test_fe2e_parity import assert_stages


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with FakeHub() as fake:
        for key, path in {"fe2e_dit": DIT, "fe2e_vae": VAE, "fe2e_lora": LORA}.items():
            file = MODEL_FILES[key]
            fake.add_file(file.hub.repo, file.hub.path, path.read_bytes(), gated=file.gated)
        hub_environment(monkeypatch, fake, tmp_path / "hf_home")
        yield fake


def test_fe2e_predict_from_the_sources_table(hub, tmp_path):
    run = load_run("sd_fp32_lora")
    eps = tmp_path / "eps.safetensors"
    save_file({"eps": run["vae_sample_eps"].contiguous()}, eps)
    raw = tmp_path / "raw.safetensors"
    argv = ["predict", "--model", "fe2e", "--dit-config", str(DIT_CONFIG), "--vae-config", str(VAE_CONFIG),
            "--prompt-cache", str(PROMPT_CACHE), "--image", str(IMAGE), "--out", str(tmp_path / "depth.png"),
            "--raw", str(raw), "--resolution", "64x48", "--dtype", "fp32", "--device", "cpu",
            "--encode-noise", str(eps)]
    assert main(argv) == 0
    assert sorted(r.path.rsplit("/", 1)[1] for r in hub.downloads()) == sorted(
        MODEL_FILES[key].hub.path for key in ("fe2e_dit", "fe2e_vae", "fe2e_lora"))
    assert_stages(load_file(raw), run, torch.float32, 1)
    hub.requests.clear()
    assert main(argv) == 0
    assert hub.requests == []  # the second run reads the files from disk
