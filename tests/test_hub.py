"""Model files from the hub (e2p_core.hub) against a local fake hub (tests/hub_support) with the real
huggingface_hub client: disk first, downloads that resume, get checked and fail with messages that say what to do.

Disk-full is simulated in-process by monkeypatching ``shutil.disk_usage`` as e2p_core.hub.fetch sees it.
"""

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from e2p_core.errors import HubError
from e2p_core.hub import MODEL_FILES, TOKENIZER_KEYS, Store, find_local, resolve, resolve_all, task_model_keys
from e2p_core.hub import fetch as fetch_module
from comfy_support import comfy_root
from hub_support import CHUNK_BYTES, FIXTURES, TINY_STAND_INS, serve_tokenizers, tiny_model_hub

KONTEXT, LORA, VAE = (MODEL_FILES[key] for key in ("kontext", "depth_lora", "vae"))
TOKEN = "hf_granted"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with tiny_model_hub(monkeypatch, tmp_path / "hf_home") as fake:
        yield fake


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def expected_sha256(key: str) -> str:
    return sha256(FIXTURES / TINY_STAND_INS[key])


def loader_visible(folder: Path) -> list[str]:
    """What a loader would list: weight files, not the .incomplete partials."""
    return sorted(path.name for path in folder.rglob("*.safetensors")) if folder.exists() else []


STORES = {"hf_cache": lambda tmp: Store(), "folder": lambda tmp: Store.directory(tmp / "models")}


@pytest.mark.parametrize("store_kind", sorted(STORES))
def test_download_then_found_on_disk_without_any_request(hub, tmp_path, store_kind):
    store = STORES[store_kind](tmp_path)
    path = resolve("depth_lora", store)
    assert sha256(path) == expected_sha256("depth_lora")
    if store_kind == "folder":
        assert path == tmp_path / "models" / "depth_lora.safetensors"
    hub.requests.clear()
    assert resolve("depth_lora", store) == path
    assert find_local("depth_lora", store) == path
    assert hub.requests == []  # a file on disk never causes a network call, not even a HEAD


def test_comfyui_store_puts_files_in_their_model_folders(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub.grant(TOKEN, KONTEXT.hub.repo)
    paths = resolve_all(task_model_keys("depth"), Store.comfyui(tmp_path / "ComfyUI"))
    models = tmp_path / "ComfyUI" / "models"
    assert paths == {"kontext": models / "diffusion_models" / "flux1-kontext-dev.safetensors",
                     "depth_lora": models / "loras" / "depth_lora.safetensors",
                     "vae": models / "vae" / "ae.safetensors"}
    for key, path in paths.items():
        assert sha256(path) == expected_sha256(key)


def test_files_in_the_hf_cache_are_copied_into_comfyui_folders_without_a_request(hub, tmp_path):
    cached = resolve("depth_lora")  # into the Hugging Face cache
    hub.requests.clear()
    store = Store.comfyui(tmp_path / "ComfyUI")
    assert resolve("depth_lora", store) == cached  # found there: used in place
    (copied,) = resolve_all(["depth_lora"], store, copy_into_store=True).values()
    assert copied == tmp_path / "ComfyUI" / "models" / "loras" / "depth_lora.safetensors"
    assert copied.read_bytes() == cached.read_bytes() and hub.requests == []
    assert list(copied.parent.iterdir()) == [copied]


@pytest.mark.parametrize("store_kind", sorted(STORES))
def test_small_files_are_checked_by_their_git_blob_id(hub, tmp_path, store_kind, monkeypatch):
    """The tokenizers are plain git files (no LFS): ETag = git's blob sha1, served by the hub itself, no redirect."""
    serve_tokenizers(hub, comfy_root())
    keys = TOKENIZER_KEYS["clip_tokenizer"]
    paths = resolve_all(keys, STORES[store_kind](tmp_path))
    for key in keys:
        source = comfy_root() / "comfy" / "sd1_tokenizer" / key.split("/", 1)[1]
        assert paths[key].read_bytes() == source.read_bytes()
    assert len({path.parent for path in paths.values()}) == 1  # one tokenizer folder
    assert all(r.server == "hub" for r in hub.requests)
    vocab = MODEL_FILES["clip_tokenizer/vocab.json"]
    hub.requests.clear()
    hub.fail(vocab.hub.repo, vocab.hub.path, "corrupt")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "second"))  # start afresh
    assert resolve("clip_tokenizer/vocab.json", STORES[store_kind](tmp_path / "second")).read_bytes() == \
        (comfy_root() / "comfy" / "sd1_tokenizer" / "vocab.json").read_bytes()
    assert len(hub.downloads("vocab.json")) == 2  # the damaged copy was detected by its blob id and fetched again


def test_vae_comes_from_schnell_when_the_hub_lists_the_same_sha256(hub, tmp_path):
    path = resolve("vae", Store.directory(tmp_path))
    assert sha256(path) == expected_sha256("vae")
    copy = VAE.ungated_copy
    assert [r.path for r in hub.downloads()] == [f"/lfs/{copy.repo}/{expected_sha256('vae')}/{copy.path}"]
    assert not any(r.path.startswith(f"/{KONTEXT.hub.repo}/resolve") for r in hub.requests)  # no gated request


def test_vae_falls_back_to_kontext_when_schnell_differs(hub, tmp_path, monkeypatch):
    hub.add_file(VAE.ungated_copy.repo, VAE.ungated_copy.path, b"another autoencoder" * 100)
    with pytest.raises(HubError, match="gated repository black-forest-labs/FLUX.1-Kontext-dev"):
        resolve("vae", Store.directory(tmp_path))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub.grant(TOKEN, VAE.hub.repo)
    assert sha256(resolve("vae", Store.directory(tmp_path))) == expected_sha256("vae")


def test_interrupted_transfer_resumes_with_a_range_request(hub, tmp_path):
    hub.fail(LORA.hub.repo, LORA.hub.path, "drop", at=3 * CHUNK_BYTES)
    path = resolve("depth_lora", Store.directory(tmp_path))
    assert sha256(path) == expected_sha256("depth_lora")
    ranges = [r.range for r in hub.downloads("depth_lora.safetensors")]
    assert ranges == [None, f"bytes={3 * CHUNK_BYTES}-"]


def test_a_download_cut_for_good_is_resumed_by_the_next_run(hub, tmp_path):
    """The transfer drops after one chunk and every resume at once: the client gives up after its retries, the partial
    stays under a name no loader lists, and the next run continues it from where it stopped."""
    hub.fail(LORA.hub.repo, LORA.hub.path, "drop", at=CHUNK_BYTES)
    hub.fail(LORA.hub.repo, LORA.hub.path, "drop", at=0, times=100)
    store = Store.directory(tmp_path)
    with pytest.raises(HubError, match="unreachable") as error:
        resolve("depth_lora", store)
    assert f"depth_lora.safetensors ({LORA.size_text}) from {hub.url}/{LORA.hub.repo}" in str(error.value)
    assert loader_visible(tmp_path) == []
    (partial,) = tmp_path.glob("depth_lora.safetensors.*.incomplete")
    kept = partial.stat().st_size
    assert kept == CHUNK_BYTES and len(hub.downloads("depth_lora.safetensors")) == 6  # the client's 5 retries
    hub.faults.clear()
    hub.requests.clear()
    assert sha256(resolve("depth_lora", store)) == expected_sha256("depth_lora")
    assert [r.range for r in hub.downloads()] == [f"bytes={kept}-"]
    assert not partial.exists()


def test_cancel_from_the_progress_callback_keeps_the_partial_for_later(hub, tmp_path):
    class Cancelled(Exception):
        pass

    seen = []

    def cancel_after_first_bytes(done, total):
        seen.append((done, total))
        if done > 2 * CHUNK_BYTES:
            raise Cancelled

    hub.fail(LORA.hub.repo, LORA.hub.path, "drop", at=2 * CHUNK_BYTES)  # the first transfer stops after 2 chunks
    with pytest.raises(Cancelled):  # ...and the resumed one is cancelled on its first bytes
        resolve("depth_lora", Store.directory(tmp_path), progress=cancel_after_first_bytes)
    size = (FIXTURES / TINY_STAND_INS["depth_lora"]).stat().st_size
    assert seen[0] == (0, size) and all(total == size for _, total in seen)
    assert loader_visible(tmp_path) == []
    assert [p.stat().st_size for p in tmp_path.glob("*.incomplete")] == [2 * CHUNK_BYTES]
    progress = []
    resolve("depth_lora", Store.directory(tmp_path), progress=lambda done, total: progress.append(done))
    assert progress[0] == 2 * CHUNK_BYTES and progress[-1] == size


@pytest.mark.parametrize("store_kind", sorted(STORES))
def test_truncated_or_corrupt_transfer_is_fetched_again(hub, tmp_path, store_kind):
    hub.fail(LORA.hub.repo, LORA.hub.path, "short", at=1000)
    path = resolve("depth_lora", STORES[store_kind](tmp_path))
    assert sha256(path) == expected_sha256("depth_lora")
    hub.fail(VAE.ungated_copy.repo, VAE.ungated_copy.path, "corrupt")
    path = resolve("vae", STORES[store_kind](tmp_path))
    assert sha256(path) == expected_sha256("vae")
    assert len(hub.downloads("ae.safetensors")) == 2


@pytest.mark.parametrize("store_kind", sorted(STORES))
@pytest.mark.parametrize("fault", ["short", "corrupt"])
def test_damaged_twice_is_an_error_and_nothing_loadable_is_left(hub, tmp_path, store_kind, fault):
    hub.fail(LORA.hub.repo, LORA.hub.path, fault, at=1000, times=2)
    with pytest.raises(HubError, match="arrived damaged twice"):
        resolve("depth_lora", STORES[store_kind](tmp_path))
    assert find_local("depth_lora", STORES[store_kind](tmp_path)) is None
    assert loader_visible(tmp_path) == []
    assert list(tmp_path.rglob("*.incomplete")) == []  # a damaged partial is useless for resuming


def test_gated_repository_says_how_to_get_access(hub, tmp_path, monkeypatch):
    with pytest.raises(HubError) as error:
        resolve("kontext", Store.directory(tmp_path))
    message = str(error.value)
    assert "HTTP 401" in message and f"{hub.url}/{KONTEXT.hub.repo}" in message  # the licence page
    assert "hf auth login" in message and "HF_TOKEN" in message
    assert "Comfy-Org/flux1-kontext-dev_ComfyUI" in message and "--base fp8" in message  # the ungated alternative
    assert "stale" not in message
    monkeypatch.setenv("HF_TOKEN", "hf_not_granted")
    with pytest.raises(HubError) as error:
        resolve("kontext", Store.directory(tmp_path))
    assert "HTTP 403" in str(error.value) and "stale" in str(error.value)
    assert loader_visible(tmp_path) == [] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("store_kind", sorted(STORES))
def test_offline_uses_the_disk_and_names_each_missing_file(hub, tmp_path, monkeypatch, store_kind):
    store = STORES[store_kind](tmp_path)
    resolve("depth_lora", store)
    hub.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert sha256(resolve("depth_lora", store)) == expected_sha256("depth_lora")  # cache filled: works
    with pytest.raises(HubError) as error:
        resolve_all(["kontext", "depth_lora", "vae"], store)
    assert hub.requests == []
    message = str(error.value)
    assert "HF_HUB_OFFLINE" in message and "depth_lora" not in message
    for file in (KONTEXT, VAE):
        where = (tmp_path / "models" if store_kind == "folder"
                 else f"a folder you pass with --models-dir (ComfyUI: models/{file.folder}/)")
        assert f"{file.name} ({file.size_text}) from {hub.url}/{file.hub.repo}/blob/main/{file.hub.path}" in message
        assert f"put it in {where}" in message


def test_unreachable_hub_names_each_missing_file(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: connection refused
    with pytest.raises(HubError, match="unreachable") as error:
        resolve_all(["depth_lora", "vae"], Store.comfyui(tmp_path))
    for file in (LORA, VAE):
        assert f"{file.name} ({file.size_text})" in str(error.value)
        assert f"put it in {tmp_path / 'models' / file.folder}" in str(error.value)


@pytest.mark.parametrize("store_kind", sorted(STORES))
def test_disk_full_says_how_much_is_needed_before_downloading(hub, tmp_path, monkeypatch, store_kind):
    real_disk_usage = fetch_module.shutil.disk_usage

    def nearly_full(path):
        return real_disk_usage(path)._replace(free=10_000_000)

    monkeypatch.setattr(fetch_module.shutil, "disk_usage", nearly_full)
    with pytest.raises(HubError, match=r"not enough disk space in .*: 23.8 GB needed, 10.0 MB free"):
        resolve("kontext", STORES[store_kind](tmp_path))
    assert hub.downloads() == [] and loader_visible(tmp_path) == []


def test_the_hub_and_the_client_are_not_imported_by_the_node_import_path():
    code = ("import sys, e2p_core.hub, e2p_core.cli_models, e2p_core.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('huggingface_hub', 'httpx2')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
