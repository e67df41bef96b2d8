"""``predict --task depth,normal,matting``: the image is VAE-encoded once for every task, each task runs its own DiT
(one at a time), and every task's files equal the one-task run's, bit for bit; bad combinations fail before any model
loads, with nothing written."""

import weakref
from pathlib import Path

import numpy as np
import pytest
from diffusers.models.autoencoders.vae import Encoder
from safetensors.torch import load_file

from conftest import FIXTURES
from e2p_core import cli_tasks, weights
from e2p_core.backends import diffusers_backend
from e2p_core.cli import main
from hub_support import tiny_model_hub

LORA = str(FIXTURES / "lora_kohya.safetensors")
POINTS = '[{"x": 20, "y": 16}]'


def predict_args(task: str, out, *extra) -> list[str]:
    return ["predict", "--task", task, "--dit-config", "{config}",
            "--image", str(FIXTURES / "input.png"), "--resolution", "64", "--dtype", "fp32", "--device", "cpu",
            "--out", str(out), *extra]


@pytest.fixture
def run(dit_config_file):
    def run_predict(task: str, out, *extra) -> None:
        args = [str(dit_config_file) if arg == "{config}" else arg for arg in predict_args(task, out, *extra)]
        assert main(args) == 0
    return run_predict


@pytest.fixture
def vae_encodes(monkeypatch) -> list[int]:
    """The batch size of every call of the VAE encoder (diffusers' ``Encoder.forward``)."""
    calls = []
    forward = Encoder.forward

    def counted(self, sample):
        calls.append(sample.shape[0])
        return forward(self, sample)

    monkeypatch.setattr(Encoder, "forward", counted)
    return calls


@pytest.fixture
def dit_loads(monkeypatch) -> list[tuple[str, list[str]]]:
    """Every DiT load (the names of its file and its LoRAs), checking that the DiT loaded before it is already freed:
    one DiT at a time."""
    loads, loaded = [], []
    load_dit, load_denoiser = weights.load_dit, diffusers_backend.load_diffusers_denoiser

    def counted_load_dit(path, config, loras):
        assert all(ref() is None for ref in loaded), "the previous task's DiT is still in memory"
        loads.append((Path(path).name, [Path(lora).name for lora, _ in loras]))
        return load_dit(path, config, loras)

    def tracked_denoiser(*args, **kwargs):
        denoiser = load_denoiser(*args, **kwargs)
        loaded.append(weakref.ref(denoiser.transformer))
        return denoiser

    monkeypatch.setattr(weights, "load_dit", counted_load_dit)
    monkeypatch.setattr(diffusers_backend, "load_diffusers_denoiser", tracked_denoiser)
    return loads


def test_depth_and_normal_encode_once_and_equal_their_one_task_runs(tmp_path, prompt_files, run, vae_encodes,
                                                                     dit_loads):
    base = ["--dit", str(FIXTURES / "dit_bfl.safetensors"), "--vae", str(FIXTURES / "vae_bfl.safetensors")]
    # Each task its own LoRA strength: a base merged in place and reused would give the second task both merges.
    per_task = {"depth": ["--lora", f"{LORA}:1.0", "--prompt-embeds", str(prompt_files["depth"])],
                "normal": ["--lora", f"{LORA}:0.5", "--prompt-embeds", str(prompt_files["normal"])]}
    scoped = [item for task, options in per_task.items() for item in _scoped(task, options)]
    run("depth,normal", tmp_path / "both" / "{task}.npy", *base, *scoped, "--raw",
        str(tmp_path / "both" / "raw_{task}.safetensors"))
    assert vae_encodes == [1]  # one image, one encode, for both tasks
    assert dit_loads == [("dit_bfl.safetensors", ["lora_kohya.safetensors"])] * 2  # the base read again per task

    for task, options in per_task.items():
        vae_encodes.clear()
        run(task, tmp_path / task / "map.npy", *base, *options, "--raw", str(tmp_path / task / "raw.safetensors"))
        assert vae_encodes == [1]
        np.testing.assert_array_equal(np.load(tmp_path / "both" / f"{task}.npy"), np.load(tmp_path / task / "map.npy"))
        together, alone = (load_file(path) for path in (tmp_path / "both" / f"raw_{task}.safetensors",
                                                        tmp_path / task / "raw.safetensors"))
        assert together.keys() == alone.keys()
        for key in alone:
            assert together[key].equal(alone[key]), key


def _scoped(task: str, options: list[str]) -> list[str]:
    """``["--lora", "x"]`` -> ``["--lora", "depth=x"]``."""
    return [value if value.startswith("--") else f"{task}={value}" for value in options]


def test_zero_config_tasks_take_each_tasks_lora_and_matting_its_points(monkeypatch, tmp_path, prompt_files, run,
                                                                       vae_encodes, dit_loads):
    prompts = [f"--prompt-embeds={task}={prompt_files[task]}" for task in ("depth", "normal", "matting")]
    with tiny_model_hub(monkeypatch, tmp_path / "hf_home", "hf_granted") as hub:
        run("depth,normal,matting", tmp_path / "maps" / "photo_{task}.png", *prompts, "--points", POINTS)
        assert hub.downloads("ae.safetensors")  # the VAE from the table too
    assert vae_encodes == [1, 1]  # the image once for all three tasks, then matting's point map
    assert dit_loads == [("flux1-kontext-dev.safetensors", [f"{task}_lora.safetensors"])
                         for task in ("depth", "normal", "matting")]
    assert sorted(path.name for path in (tmp_path / "maps").iterdir()) == [
        "photo_depth.png", "photo_matting.png", "photo_normal.png"]

    # The matte equals a one-task run with the same files given explicitly (the stand-in LoRA is the fixture's).
    run("matting", tmp_path / "alone.png", "--dit", str(FIXTURES / "dit_bfl.safetensors"), "--lora", LORA,
        "--vae", str(FIXTURES / "vae_bfl.safetensors"), "--prompt-embeds", str(prompt_files["matting"]),
        "--points", POINTS)
    assert (tmp_path / "maps" / "photo_matting.png").read_bytes() == (tmp_path / "alone.png").read_bytes()


@pytest.mark.parametrize("args, message", [
    (["--task", "depth,depth"], "names a task twice"),
    (["--task", "depth,albedo"], "unknown task 'albedo'"),
    (["--out", "{out}/map.png"], "put {task} in the name"),
    (["--raw", "{out}/raw.safetensors"], "put {task} in the name"),
    (["--out", "{out}/{task}.jpg"], "expected a .png or .npy file"),
    (["--tiles", "2"], "once per task"),
    (["--image", str(FIXTURES)], "once per task"),
    (["--points", POINTS], "has no matting"),
    (["--task", "depth", "--out", "{out}/depth.png", "--points", POINTS], "has no matting"),  # one task: the same
    (["--lora", f"matting={LORA}"], "matting is not in --task depth,normal"),
    (["--prompt-embeds", "{prompt}"], "the same --prompt-embeds"),
    (["--model", "fe2e", "--task", None, "--lora", f"depth={LORA}"], "belong to Edit2Perceive"),
])
def test_bad_combinations_fail_before_any_model_loads(monkeypatch, tmp_path, capsys, prompt_files, args, message):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model loaded before the arguments were checked")

    monkeypatch.setattr(cli_tasks, "load_codec", no_loading)
    monkeypatch.setattr(weights, "load_dit", no_loading)
    options = {"--task": "depth,normal", "--out": "{out}/{task}.png", "--dit": str(FIXTURES / "dit_bfl.safetensors"),
               "--vae": str(FIXTURES / "vae_bfl.safetensors"), "--image": str(FIXTURES / "input.png"),
               "--device": "cpu"}
    options.update(dict(zip(args[::2], args[1::2])))
    fills = {"{out}": str(tmp_path / "out"), "{prompt}": str(prompt_files["depth"])}
    argv = ["predict"]
    for flag, value in options.items():
        if value is not None:
            for key, fill in fills.items():
                value = value.replace(key, fill)
            argv += [flag, value]
    try:
        status = main(argv)
    except SystemExit as exit:  # argparse's own errors (the --task names)
        status = exit.code
    assert status == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
