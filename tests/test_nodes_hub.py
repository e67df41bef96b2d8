"""The loader nodes and the hub: known files not on disk are listed as downloads with their size; running the node
fetches them into ComfyUI's model folders with a progress bar and Cancel, then loads them; present files never cause
a network call. ComfyUI's modules run in-process (tests/comfy_support); the hub is the fake one (tests/hub_support).
"""

import json

import pytest
from comfy_support import load_pack, use_model_folders
from hub_support import tiny_model_hub

from conftest import FIXTURES, TINY_DIT_CONFIG
from e2p_core.hub import MODEL_FILES

pack = load_pack()
import comfy.model_management  # noqa: E402
import comfy.utils  # noqa: E402
from e2p_pack.nodes.loader import E2PModelLoader, E2PVAELoader  # noqa: E402
from e2p_pack.nodes.model_files import choices  # noqa: E402

TOKEN = "hf_granted"
KONTEXT, LORA = MODEL_FILES["kontext"], MODEL_FILES["depth_lora"]
KONTEXT_LABEL = "flux1-kontext-dev.safetensors (download 23.8 GB)"
LORA_LABEL = "depth_lora.safetensors (download 610.0 MB)"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with tiny_model_hub(monkeypatch, tmp_path / "hf_home", TOKEN) as fake:
        yield fake


@pytest.fixture
def folders(tmp_path):
    folders = use_model_folders(tmp_path / "models")
    # The tiny DiT is not FLUX-sized: the loader reads its RoPE axes from a sidecar, as for any such file.
    (folders["diffusion_models"] / "flux1-kontext-dev.json").write_text(json.dumps(TINY_DIT_CONFIG))
    return folders


@pytest.fixture
def progress_events(monkeypatch):
    events = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK",
                        lambda value, total, preview, node_id=None: events.append((node_id, value, total)))
    return events


def test_pickers_list_known_files_as_downloads_until_they_are_on_disk(hub, folders):
    assert KONTEXT_LABEL in choices("diffusion_models")
    assert "depth.safetensors (download 23.8 GB)" in choices("diffusion_models")
    assert LORA_LABEL in choices("loras") and "ae.safetensors (download 335.3 MB)" in choices("vae")
    (folders["loras"] / "depth_lora.safetensors").write_bytes((FIXTURES / "lora_kohya.safetensors").read_bytes())
    assert "depth_lora.safetensors" in choices("loras") and LORA_LABEL not in choices("loras")
    inputs = E2PModelLoader.INPUT_TYPES()["required"]
    assert KONTEXT_LABEL in inputs["model_name"][0] and "normal_lora.safetensors (download 610.0 MB)" in \
        inputs["lora_name"][0]
    assert hub.requests == []  # listing never asks the hub


def test_choosing_downloads_fetches_into_comfyui_folders_then_loads(hub, folders, progress_events):
    (model,) = E2PModelLoader().load(KONTEXT_LABEL, "default", LORA_LABEL, 1.0, node_id="7")
    assert (folders["diffusion_models"] / "flux1-kontext-dev.safetensors").read_bytes() == \
        (FIXTURES / "dit_bfl.safetensors").read_bytes()
    assert (folders["loras"] / "depth_lora.safetensors").read_bytes() == \
        (FIXTURES / "lora_kohya.safetensors").read_bytes()
    assert len(model.patches) == 26  # the downloaded LoRA is applied
    for fixture in ("dit_bfl.safetensors", "lora_kohya.safetensors"):
        size = (FIXTURES / fixture).stat().st_size
        assert ("7", 0, size) in progress_events and ("7", size, size) in progress_events  # bytes, per node
    hub.requests.clear()
    # Now present: the plain names and the labels both load from disk, with no request.
    for model_name, lora_name in ((KONTEXT.name, LORA.name), (KONTEXT_LABEL, LORA_LABEL)):
        assert E2PModelLoader.VALIDATE_INPUTS(model_name, lora_name) is True
        (again,) = E2PModelLoader().load(model_name, "default", lora_name, 1.0)
        assert len(again.patches) == 26
    assert hub.requests == []


def test_cancel_stops_the_download_and_the_next_run_resumes(hub, folders):
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            E2PModelLoader().load(KONTEXT_LABEL, "default", "none", 1.0)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert not (folders["diffusion_models"] / "flux1-kontext-dev.safetensors").exists()
    assert len(list(folders["diffusion_models"].glob("*.incomplete"))) == 1  # kept for the next run
    (model,) = E2PModelLoader().load(KONTEXT_LABEL, "default", "none", 1.0)
    assert (folders["diffusion_models"] / "flux1-kontext-dev.safetensors").is_file()
    assert not list(folders["diffusion_models"].glob("*.incomplete"))


def test_unknown_names_are_rejected_and_hub_errors_reach_the_user(hub, folders, monkeypatch):
    assert E2PModelLoader.VALIDATE_INPUTS("nothing.safetensors", "none") != True  # noqa: E712
    assert E2PModelLoader.VALIDATE_INPUTS(KONTEXT_LABEL, "nothing.safetensors") != True  # noqa: E712
    assert E2PVAELoader.VALIDATE_INPUTS("ae.safetensors") is True
    monkeypatch.delenv("HF_TOKEN")
    from e2p_pack.e2p_core.errors import HubError

    with pytest.raises(HubError, match="hf auth login"):
        E2PModelLoader().load(KONTEXT_LABEL, "default", "none", 1.0)
    assert [path.name for path in folders["diffusion_models"].iterdir()] == ["flux1-kontext-dev.json"]
