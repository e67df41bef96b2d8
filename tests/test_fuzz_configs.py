"""Fuzzing the JSON configs a user gives: ``--dit-config`` / ``--vae-config`` (and the node loader's ``<dit>.json``)
as any bytes or any settings, up to the models built from an accepted one, and ``python -m train`` config files.
Each config is accepted, or ends in the project's error with a message; the CLI then exits with status 2 and writes
nothing. Budget and seed: the hypothesis profile in tests/conftest.py."""

import functools
import json
import shutil

import numpy as np
import pytest
import torch
from comfy_support import load_pack
from fuzz_support import JSON_VALUES, budget, parses_or_user_error, run_cli_expecting_error
from hypothesis import given
from hypothesis import strategies as st

from conftest import FIXTURES, TINY_DIT_CONFIG
from e2p_core.backends.diffusers_backend import load_diffusers_backend
from e2p_core.checkpoints import infer_dit_architecture, infer_vae_architecture, load_config_json
from e2p_core.cli import main
from e2p_core.pipeline import perceive
from e2p_core.prompts import load_prompt_embeddings
from e2p_core.weights import load_dit, load_vae

load_pack()
from e2p_pack.nodes.loader import load_e2p_model  # noqa: E402

TINY_VAE_CONFIG = {"block_out_channels": [32, 64, 64, 64], "layers_per_block": 2, "latent_channels": 16,
                   "norm_num_groups": 32, "scaling_factor": 0.3611, "shift_factor": 0.1159}
# Values near the right ones (so that configs pass the first checks and reach the model) and anything JSON holds.
PLAUSIBLE = {"axes_dims_rope": [[4, 6, 6], [6, 4, 6], [0, 8, 8], [16, 0], [-4, 10, 10], [4.5, 5.5, 6], ["4", 6, 6]],
             "patch_size": [1, 2, 0], "num_layers": [1, 2], "attention_head_dim": [16, 8],
             "num_attention_heads": [4, 8], "guidance_embeds": [True, False],
             "block_out_channels": [[32, 64, 64, 64], [32, 64]], "layers_per_block": [2, 1],
             "latent_channels": [16, 4], "norm_num_groups": [32, 16, 3, 0, -32, 1e400, 32.5],
             "scaling_factor": [0.3611, 0, -1.0, 1e-300, float("nan"), float("inf")],
             "shift_factor": [0.1159, None, float("nan"), 1e300, -2.0]}
CONFIG_VALUES = JSON_VALUES | st.one_of([st.sampled_from(values) for values in PLAUSIBLE.values()])
CONFIGS = st.dictionaries(st.sampled_from(sorted(PLAUSIBLE)) | st.text(max_size=4), CONFIG_VALUES, max_size=4)
CONFIG_BYTES = st.one_of(
    st.binary(max_size=40),
    JSON_VALUES.map(lambda value: json.dumps(value).encode()),
    st.integers(1, 5000).map(lambda depth: ("{\"a\":" * depth + "1" + "}" * depth).encode()),
    CONFIGS.map(lambda config: json.dumps(config).encode()),
)


@functools.cache
def fixture_state_dicts():
    return (load_dit(FIXTURES / "dit_bfl.safetensors", TINY_DIT_CONFIG).state_dict_bfl,
            load_vae(FIXTURES / "vae_bfl.safetensors").state_dict_diffusers)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz_configs")
    shutil.copy(FIXTURES / "dit_bfl.safetensors", folder / "dit.safetensors")
    return folder


@given(CONFIG_BYTES)
def test_config_files_parse_or_are_refused(folder, blob):
    """Any bytes as a config file, through the readers and the architecture checks (the node reads the same file
    beside the DiT as ``dit.json``)."""
    path = folder / "dit.json"
    path.write_bytes(blob)
    config = parses_or_user_error(load_config_json, path)
    if config is not None:
        assert isinstance(config, dict)
        dit_sd, vae_sd = fixture_state_dicts()
        parses_or_user_error(infer_dit_architecture, dit_sd, config)
        parses_or_user_error(infer_vae_architecture, vae_sd, config)


@budget(12)  # an accepted config runs the tiny model once
@given(dit_config=CONFIGS, vae_config=CONFIGS)
def test_accepted_configs_build_models_that_run(folder, prompt_files, dit_config, vae_config):
    """Settings of any type and value; those accepted build the diffusers backend (and the node's ComfyUI model)
    and predict a finite depth map."""
    dit = parses_or_user_error(load_dit, folder / "dit.safetensors", {**TINY_DIT_CONFIG, **dit_config})
    vae = parses_or_user_error(load_vae, FIXTURES / "vae_bfl.safetensors", {**TINY_VAE_CONFIG, **vae_config})
    (folder / "dit.json").write_text(json.dumps({**TINY_DIT_CONFIG, **dit_config}, allow_nan=True))
    parses_or_user_error(load_e2p_model, folder / "dit.safetensors")
    if dit is None or vae is None:
        return
    backend = parses_or_user_error(load_diffusers_backend, dit, vae, torch.float32)
    if backend is not None:
        image = np.full((16, 16, 3), 128, dtype=np.uint8)
        result = parses_or_user_error(perceive, *backend, image, "depth", load_prompt_embeddings(prompt_files["depth"]),
                                      resolution="native")
        assert result is not None and torch.isfinite(result.output).all()


@budget(15)
@given(blob=CONFIG_BYTES, flag=st.sampled_from(["--dit-config", "--vae-config"]))
def test_cli_configs_end_in_an_error_and_write_nothing(folder, prompt_files, blob, flag):
    """A config file of any bytes (a missing --vae or --dit-config ends a run that accepts it)."""
    path = folder / "cli_config.json"
    path.write_bytes(blob)
    out = folder / "cli_out"
    other = {"--dit-config": ["--vae", str(folder / "missing_vae.safetensors")],
             "--vae-config": ["--vae", str(FIXTURES / "vae_bfl.safetensors"),
                              "--dit-config", str(folder / "missing.json")]}[flag]
    argv = ["predict", "--task", "depth", "--dit", str(FIXTURES / "dit_bfl.safetensors"), *other, flag, str(path),
            "--prompt-embeds", str(prompt_files["depth"]), "--image", str(FIXTURES / "input.png"),
            "--device", "cpu", "--out", str(out / "depth.png")]
    run_cli_expecting_error(main, argv, out)


# ---------------------------------------------------------------------------------------------- python -m train


def _train_fields():
    from dataclasses import fields

    from train.config import TrainConfig

    return sorted(item.name for item in fields(TrainConfig))


TRAIN_VALUES = JSON_VALUES | st.sampled_from([
    1, 0, -1, 16, 17, 2.5, float("inf"), "bf16", "lora", "depth", "", None, True, [], {},
    [{"kind": "folder", "root": "data"}], [{"kind": "folder"}], [{"kind": "folder", "root": "data", "ratio": "x"}],
    [{"kind": "folder", "root": "data", "ratio": -1}], [{"kind": "folder", "root": 5}], ["folder"],
])
TRAIN_CONFIGS = st.dictionaries(st.sampled_from(_train_fields()) | st.text(max_size=4), TRAIN_VALUES, max_size=5)
TRAIN_CONFIGS = TRAIN_CONFIGS | TRAIN_CONFIGS.map(lambda config: {"datasets": [{"kind": "folder", "root": "data"}],
                                                                  **config})


@given(config=TRAIN_CONFIGS, style=st.sampled_from(["json", "yaml", "bytes"]), raw=st.binary(max_size=40),
       dataset_flag=st.booleans())
def test_train_config_files_parse_or_are_refused(folder, config, style, raw, dataset_flag):
    """A ``--config`` file with any settings (JSON or YAML) or any bytes, beside valid required flags (the datasets
    from the file or from a flag)."""
    import yaml

    from train.config import parse_config

    path = folder / ("train.yaml" if style == "yaml" else "train.json")
    if style == "bytes":
        path.write_bytes(raw)
    else:
        path.write_text(yaml.safe_dump(config) if style == "yaml" else json.dumps(config))
    parsed = parses_or_user_error(parse_config, ["--config", str(path), "--base", "dit.safetensors", "--vae",
                                                 "ae.safetensors", "--prompt-embeds", "depth.safetensors",
                                                 *(["--dataset", "kind=folder,root=data"] if dataset_flag else [])])
    if parsed is not None:
        parsed.dataset_specs()
        parsed.dataset_specs(validation=True)
