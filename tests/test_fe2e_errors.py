"""FE2E bad input through the Python API and the CLI: a clear project error, and nothing written."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import FIXTURES as E2P_FIXTURES
from e2p_core.cli import main
from e2p_core.connector import load_prompt_cache
from e2p_core.errors import CheckpointError, InputError
from e2p_core.weights import load_dit, load_step1x, lora_family
from fe2e_support import DIT, DIT_CONFIG, IMAGE, LORA, PROMPT_CACHE, VAE, VAE_CONFIG

E2P_DIT = E2P_FIXTURES / "dit_bfl.safetensors"
E2P_LORA = E2P_FIXTURES / "lora_kohya.safetensors"


def fe2e_argv(tmp_path, **overrides):
    args = {"--dit": str(DIT), "--dit-config": str(DIT_CONFIG), "--vae": str(VAE), "--vae-config": str(VAE_CONFIG),
            "--prompt-cache": str(PROMPT_CACHE), "--image": str(IMAGE), "--out": str(tmp_path / "depth.png"),
            "--out-normal": str(tmp_path / "normal.png"), "--raw": str(tmp_path / "raw.safetensors"),
            "--resolution": "64x48", "--dtype": "fp32", "--device": "cpu"}
    args.update(overrides)
    argv = ["predict", "--model", "fe2e"]
    for flag, value in args.items():
        if value is not None:
            argv += [flag, value]
    return argv


def assert_fails_cleanly(argv, tmp_path, capsys, *phrases):
    before = sorted(tmp_path.iterdir())
    assert main(argv) == 2
    message = capsys.readouterr().err
    assert message.startswith("error: ")
    for phrase in phrases:
        assert phrase in message, message
    assert sorted(tmp_path.iterdir()) == before  # nothing written, no temp files left


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_edit2perceive_dit_given_as_fe2e(tmp_path, capsys):
    with pytest.raises(CheckpointError, match="not a Step1X-Edit"):
        load_step1x(E2P_DIT)
    assert_fails_cleanly(fe2e_argv(tmp_path, **{"--dit": str(E2P_DIT)}), tmp_path, capsys,
                         "dit_bfl.safetensors", "--model e2p")


def test_fe2e_checkpoint_given_as_edit2perceive(tmp_path, capsys, prompt_files):
    with pytest.raises(CheckpointError, match="Step1X-Edit"):
        load_dit(DIT)
    argv = ["predict", "--task", "depth", "--dit", str(DIT), "--vae", str(E2P_FIXTURES / "vae_bfl.safetensors"),
            "--prompt-embeds", str(prompt_files["depth"]), "--image", str(IMAGE), "--out", str(tmp_path / "d.png"),
            "--dtype", "fp32", "--device", "cpu"]
    assert_fails_cleanly(argv, tmp_path, capsys, "step1x-edit-i1258.safetensors", "--model fe2e")


def test_lora_for_the_other_base(tmp_path, capsys, dit_config_file):
    """The tiny models, like the real ones, share every LoRA shape: the file's own writing tells them apart."""
    assert lora_family(E2P_LORA) == "e2p" and lora_family(LORA) == "fe2e"
    assert_fails_cleanly(fe2e_argv(tmp_path, **{"--lora": str(E2P_LORA)}), tmp_path, capsys,
                         "lora_kohya.safetensors", "Edit2Perceive", "--model e2p")
    with pytest.raises(CheckpointError, match="FE2E"):
        load_dit(E2P_DIT, dit_config_file, [(LORA, 1.0)])


def test_lora_family_of_other_files(tmp_path):
    """An E2P LoRA recording its time embedding, and kohya files of another scale, are told apart or left alone."""
    pairs = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 64),
             "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(192, 4)}
    save_file(pairs | {"lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(4.0)}, tmp_path / "a.safetensors")
    save_file(pairs | {"lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(2.0)}, tmp_path / "b.safetensors",
              metadata={"e2p.time_embedding": "bf16"})
    assert lora_family(tmp_path / "a.safetensors") is None
    assert lora_family(tmp_path / "b.safetensors") == "e2p"


def test_missing_prompt_cache(tmp_path, capsys):
    assert_fails_cleanly(fe2e_argv(tmp_path, **{"--prompt-cache": str(tmp_path / "no_info.npz")}), tmp_path, capsys,
                         "no_info.npz", "does not exist")
    assert_fails_cleanly(fe2e_argv(tmp_path, **{"--prompt-cache": None}), tmp_path, capsys, "--prompt-cache")


@pytest.mark.parametrize("arrays, phrase", [
    ({"embeds": np.zeros((4, 48), np.float32)}, "lacks ['masks']"),
    ({"embeds": np.zeros((4, 48), np.float32), "masks": np.ones(5, np.int64)}, "'masks'"),
    ({"embeds": np.zeros((4, 48), np.int64), "masks": np.ones(4, np.int64)}, "expected float"),
    ({"embeds": np.full((4, 48), np.nan, np.float32), "masks": np.ones(4, np.int64)}, "NaN"),
    ({"embeds": np.zeros((4, 48), np.float32), "masks": np.zeros(4, np.int64)}, "at least one 1"),
])
def test_malformed_prompt_cache(tmp_path, capsys, arrays, phrase):
    folder = tmp_path / "in"
    folder.mkdir()
    path = write_npz(folder / "bad.npz", **arrays)
    with pytest.raises(InputError, match="bad.npz"):
        load_prompt_cache(path)
    out = tmp_path / "out"
    out.mkdir()
    assert_fails_cleanly(fe2e_argv(out, **{"--prompt-cache": path}), out, capsys, phrase)


def test_prompt_cache_of_another_width_and_not_an_npz(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    wide = write_npz(folder / "wide.npz", embeds=np.zeros((4, 40), np.float32), masks=np.ones(4, np.int64))
    garbage = folder / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    out = tmp_path / "out"
    out.mkdir()
    assert_fails_cleanly(fe2e_argv(out, **{"--prompt-cache": wide}), out, capsys, "40-wide", "48")
    assert_fails_cleanly(fe2e_argv(out, **{"--prompt-cache": str(garbage)}), out, capsys, "garbage.npz")


def test_bad_noise_and_options(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    eps = folder / "eps.safetensors"
    save_file({"eps": torch.zeros(1, 16, 4, 4)}, str(eps))
    out = tmp_path / "out"
    out.mkdir()
    assert_fails_cleanly(fe2e_argv(out, **{"--encode-noise": str(eps)}), out, capsys, "encode noise", "[1,16,6,8]")
    assert_fails_cleanly(fe2e_argv(out, **{"--noise": str(eps)}), out, capsys, "'noise'")
    assert_fails_cleanly(fe2e_argv(out, **{"--resolution": "60x48"}), out, capsys, "multiples of 16")
    assert_fails_cleanly(fe2e_argv(out, **{"--out-normal": str(out / "n.jpg")}), out, capsys, "--out-normal")


@pytest.mark.parametrize("connector, phrase", [
    ({"num_attention_heads": 5}, "num_attention_heads=5"),
    ({"num_attention_heads": "4"}, "num_attention_heads='4'"),
    ({"hidden_size": 64}, "hidden_size=64"),
    (3, "must be an object"),
])
def test_bad_connector_config(connector, phrase):
    config = {"axes_dims_rope": [4, 6, 6], "connector": connector}
    with pytest.raises(CheckpointError, match=phrase):
        load_step1x(DIT, config)
