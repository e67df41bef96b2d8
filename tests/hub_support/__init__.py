"""Test support for hub downloads: the fake hub server and the tiny test weights under the real repository names."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

from e2p_core.hub import MODEL_FILES, TOKENIZER_KEYS

from .fake_hub import FakeHub, Request

FIXTURES = Path(__file__).parent.parent / "fixtures" / "e2p_tiny"
CHUNK_BYTES = 16 * 1024  # the client's write chunk in tests (see hub_environment)

# The table's files, played by the tiny parity weights: the Kontext base by the tiny BFL DiT, the task LoRAs by the
# tiny kohya LoRA, the full checkpoints by the tiny DiffSynth DiT (the released full checkpoints' naming), the Flux
# VAE by the tiny VAE (in Kontext's repository and, byte-identical, in schnell's).
TINY_STAND_INS = {
    "kontext": "dit_bfl.safetensors",
    "vae": "vae_bfl.safetensors",
    **{f"{task}_lora": "lora_kohya.safetensors" for task in ("depth", "normal", "matting")},
    **{f"{task}_full": "dit_diffsynth.safetensors" for task in ("depth", "normal", "matting")},
}


def serve_tokenizers(hub: FakeHub, comfyui_root: Path) -> None:
    """The FLUX tokenizer files of the table, played by the copies ComfyUI ships (small files: served as git blobs)."""
    folders = {"clip_tokenizer": comfyui_root / "comfy" / "sd1_tokenizer",
               "t5_tokenizer": comfyui_root / "comfy" / "text_encoders" / "t5_tokenizer"}
    for group, keys in TOKENIZER_KEYS.items():
        for key in keys:
            file = MODEL_FILES[key]
            hub.add_file(file.hub.repo, file.hub.path, folders[group] / key.split("/", 1)[1])


def serve_tiny_models(hub: FakeHub) -> None:
    """Put the tiny stand-ins on ``hub`` at the table's repositories and paths (FLUX.1-Kontext-dev gated)."""
    for key, fixture in TINY_STAND_INS.items():
        file = MODEL_FILES[key]
        data = (FIXTURES / fixture).read_bytes()
        hub.add_file(file.hub.repo, file.hub.path, data, gated=file.gated)
        if file.ungated_copy is not None:
            hub.add_file(file.ungated_copy.repo, file.ungated_copy.path, data, gated=False)


__all__ = ["CHUNK_BYTES", "FIXTURES", "TINY_STAND_INS", "FakeHub", "Request", "hub_environment", "serve_tiny_models",
           "serve_tokenizers", "tiny_model_hub"]


def hub_environment(monkeypatch, hub: FakeHub, home: Path) -> None:
    """Point the real client at ``hub`` with an empty cache in ``home`` and no token, offline mode off."""
    import huggingface_hub.constants
    import huggingface_hub.file_download

    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(home))
    for name in ("HF_HUB_CACHE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    # A token saved by `hf auth login` on this machine must not leak in (the client read these paths at import).
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    # The client sleeps 1 s before each resume of a dropped transfer; the tests drop many on purpose.
    monkeypatch.setattr(huggingface_hub.file_download, "time", SimpleNamespace(sleep=lambda _seconds: None))
    # The client writes what arrives in chunks of 10 MB, so a transfer cut inside the first chunk restarts from 0;
    # the tiny test files are smaller than that, so the chunks shrink with them.
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", CHUNK_BYTES)


@contextmanager
def tiny_model_hub(monkeypatch, home: Path, token: str | None = None) -> Iterator[FakeHub]:
    """A running fake hub with the tiny stand-ins, the client pointed at it (``hub_environment``); with ``token``,
    HF_TOKEN is set to a token granted FLUX.1-Kontext-dev's licence."""
    with FakeHub() as hub:
        serve_tiny_models(hub)
        hub_environment(monkeypatch, hub, home)
        if token is not None:
            monkeypatch.setenv("HF_TOKEN", token)
            hub.grant(token, MODEL_FILES["kontext"].hub.repo)
        yield hub
