"""Shared test data: the official-code parity fixtures (tests/fixtures/e2p_tiny, see its README) and files the
tests derive from them (prompt embeddings, the tiny DiT's config.json)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, settings
from safetensors.torch import load_file

from e2p_core.prompts import PromptEmbeddings, save_prompt_embeddings

# Fuzz tests (tests/test_fuzz_*.py): a fixed example budget and a derandomized seed, so CI runs the same inputs every
# time and stays fast; HYPOTHESIS_PROFILE=explore searches longer with fresh random inputs on a developer's machine,
# HYPOTHESIS_PROFILE=debug reports a failure without shrinking it.
settings.register_profile("ci", max_examples=60, derandomize=True, database=None, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("explore", max_examples=2000, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("debug", parent=settings.get_profile("ci"), phases=[Phase.explicit, Phase.generate])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

FIXTURES = Path(__file__).parent / "fixtures" / "e2p_tiny"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
TINY_DIT_CONFIG = {"axes_dims_rope": MANIFEST["tiny_config"]["rope_axes_dim"]}  # the one thing shapes cannot tell
# Where the parity tests run the model: cpu (CI), or cuda for the GPU check (bench/gpu_check.sh), at the same
# tolerances. float32 on CUDA must not silently use TF32 (matmul and cuDNN convolutions), or 1e-5 is out of reach.
PARITY_DEVICE = os.environ.get("E2P_PARITY_DEVICE", "cpu")
if PARITY_DEVICE.startswith("cuda"):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


@pytest.fixture(scope="session")
def inputs_npz():
    return dict(np.load(FIXTURES / "inputs.npz"))


@pytest.fixture(scope="session")
def dit_config_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "config.json"
    path.write_text(json.dumps(TINY_DIT_CONFIG))
    return path


@pytest.fixture(scope="session")
def prompt_files(tmp_path_factory, inputs_npz) -> dict[str, Path]:
    """One prompt-embeddings file per task, holding the fixture's random stand-ins for T5 and CLIP."""
    folder = tmp_path_factory.mktemp("prompts")
    files = {}
    for task in ("depth", "normal", "matting"):
        embeddings = PromptEmbeddings(torch.from_numpy(inputs_npz[f"{task}_t5_emb"]),
                                      torch.from_numpy(inputs_npz[f"{task}_pooled_emb"]), MANIFEST["prompts"][task])
        files[task] = folder / f"{task}.safetensors"
        save_prompt_embeddings(embeddings, files[task])
    return files


def load_run(name: str) -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / f"run_{name}.safetensors")
