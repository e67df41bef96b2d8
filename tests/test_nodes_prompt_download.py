"""The conditioning node's 'auto' embeddings when <task>.safetensors is missing and no CLIP is connected: the task
prompt is encoded once with CLIP-L + T5 from models/text_encoders, fetched there from the (fake) hub when absent, and
saved as e2p_prompts/<task>.safetensors; later runs read the file with no encoder and no request.

The hub serves tiny ComfyUI-format encoders under the table's names and ComfyUI's copies of the real tokenizers
(tests/text_encoder_support, tests/hub_support). Expected embeddings come from the in-memory tiny models fed the
hand-derived reference token ids, computed in bf16 as the node encodes.
"""

import pytest
import torch
from comfy_support import comfy_root, load_pack, use_model_folders
from hub_support import serve_tokenizers, tiny_model_hub
from text_encoder_support import build_tiny_comfy_encoders, reference_ids

from e2p_core.hub import MODEL_FILES
from e2p_core.tasks import TASKS

pack = load_pack()
from e2p_pack.e2p_core import text_encoders  # noqa: E402
from e2p_pack.nodes.conditioning import E2PTaskConditioning  # noqa: E402


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    return build_tiny_comfy_encoders(tmp_path_factory.mktemp("encoders"), clip_width=64, t5_width=32)


@pytest.fixture
def hub(monkeypatch, tmp_path, encoders):
    with tiny_model_hub(monkeypatch, tmp_path / "hf_home") as fake:
        serve_tokenizers(fake, comfy_root())
        for key in ("clip_l", "t5xxl_fp16"):
            fake.add_file(MODEL_FILES[key].hub.repo, MODEL_FILES[key].hub.path, encoders.folder / MODEL_FILES[key].name)
        monkeypatch.setattr(text_encoders, "running_comfyui_root", lambda: None)  # no ComfyUI tokenizers to use
        yield fake


def expected_bf16(encoders, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    ids = reference_ids(prompt)
    clip, t5 = encoders.clip.to(torch.bfloat16), encoders.t5.to(torch.bfloat16)
    try:
        with torch.no_grad():
            pooled = clip(input_ids=torch.tensor([ids.clip])).last_hidden_state[:, ids.clip.index(49407)]
            embeds = t5(input_ids=torch.tensor([ids.t5])).last_hidden_state
    finally:
        encoders.clip.float(), encoders.t5.float()
    return embeds, pooled


def test_auto_embeddings_are_encoded_once_from_downloaded_encoders(hub, tmp_path, encoders):
    folders = use_model_folders(tmp_path / "models")
    ((conditioning, extras),) = E2PTaskConditioning().encode("depth", "auto")[0]
    for file in ("clip_l.safetensors", "t5xxl_fp16.safetensors", "flux_tokenizers/tokenizer/vocab.json",
                 "flux_tokenizers/tokenizer_2/tokenizer.json"):
        assert (folders["text_encoders"] / file).is_file(), file
    assert (folders["e2p_prompts"] / "depth.safetensors").is_file()
    embeds, pooled = expected_bf16(encoders, TASKS["depth"].prompt)
    torch.testing.assert_close(conditioning, embeds, rtol=0, atol=0)
    torch.testing.assert_close(extras["pooled_output"], pooled, rtol=0, atol=0)

    hub.requests.clear()
    for file in folders["text_encoders"].glob("*.safetensors"):
        file.unlink()  # the file made on the first run is all a second run needs
    ((again, _),) = E2PTaskConditioning().encode("depth", "auto")[0]
    assert torch.equal(again, conditioning) and hub.requests == []


def test_offline_without_encoders_names_the_files_to_fetch(hub, tmp_path, monkeypatch):
    from e2p_pack.e2p_core.errors import HubError

    folders = use_model_folders(tmp_path / "models")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError) as error:
        E2PTaskConditioning().encode("depth", "auto")
    for name in ("clip_l.safetensors", "t5xxl_fp16.safetensors", "flux_tokenizers/tokenizer_2/tokenizer.json"):
        assert name in str(error.value)
    assert f"put it in {folders['text_encoders']}" in str(error.value) and hub.requests == []
