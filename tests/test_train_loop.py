"""``python -m train`` end to end on the tiny fixture model and synthetic scenes: the loss falls when overfitting,
and every task trains under both objectives with finite losses."""

import json
import math
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, TINY_DIT_CONFIG
from e2p_core.backends.diffusers_backend import DiffusersDenoiser
from e2p_core.errors import InputError
from e2p_core.weights import load_dit
from train.data import DatasetSpec, build_dataset
from train.model import build_trainable_transformer
from train.step import ObjectiveConfig, training_losses
from train.trainer import train
from train_support.runs import one_thread, read_log, tiny_config, write_tiny_setup  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def evaluation_losses(transformer, result, batch, task: str) -> tuple[float, float]:
    """Flow-matching and consistency loss of ``batch`` averaged over 8 fixed timestep draws (no gradients)."""
    denoiser = DiffusersDenoiser(transformer, torch.float32, torch.device("cpu"))
    objective = ObjectiveConfig(task, "paper", lambda_start_epoch=0.0)
    fm, consistency = [], []
    with torch.no_grad():
        for seed in range(8):
            losses = training_losses(denoiser, result.codec, result.prompt, batch, objective,
                                     torch.Generator().manual_seed(seed), step=1, steps_per_epoch=1)
            fm.append(float(losses["loss_fm"]))
            consistency.append(float(losses["loss_consistency"]))
    return sum(fm) / len(fm), sum(consistency) / len(consistency)


@pytest.fixture(scope="module")
def two_scenes(tmp_path_factory):
    setup = write_tiny_setup(tmp_path_factory.mktemp("setup"), "depth", samples=2)
    dataset = build_dataset(DatasetSpec("folder", setup["data"]), "depth", (32, 32))
    base = build_trainable_transformer(load_dit(FIXTURES / "dit_bfl.safetensors", TINY_DIT_CONFIG), "bf16",
                                       torch.float32, "cpu")  # the untrained model: the LoRA starts at zero
    return setup, torch.utils.data.default_collate([dataset[0], dataset[1]]), base


def test_overfitting_two_scenes_makes_the_flow_matching_loss_fall(tmp_path, two_scenes):
    setup, batch, base = two_scenes
    config = tiny_config(setup, "depth", tmp_path / "run", max_steps=40, lora_rank=8, learning_rate=3e-3,
                         lambda_start_epoch=1000.0, lr_scheduler="constant")
    result = train(config)
    fm_before, _ = evaluation_losses(base, result, batch, "depth")
    fm_after, _ = evaluation_losses(result.transformer, result, batch, "depth")
    assert fm_after < 0.5 * fm_before
    log = read_log(tmp_path / "run")
    assert sorted(log) == list(range(1, 41)) and all(entry["lambda"] == 0 for entry in log.values())


def test_the_adaptive_lambda_switches_on_after_the_first_epoch_and_the_consistency_loss_falls(
        tmp_path, two_scenes):
    setup, batch, base = two_scenes
    config = tiny_config(setup, "depth", tmp_path / "run", max_steps=40, lora_rank=8, learning_rate=3e-3,
                         lr_scheduler="constant")  # the paper's schedule: λ = 0 during epoch 1 (1 step here)
    result = train(config)
    _, consistency_before = evaluation_losses(base, result, batch, "depth")
    _, consistency_after = evaluation_losses(result.transformer, result, batch, "depth")
    assert consistency_after < 0.8 * consistency_before
    log = read_log(tmp_path / "run")
    assert log[1]["lambda"] == 0 and log[2]["lambda"] == 0  # steps 0 and 1 (logged as 1, 2): epoch <= 1
    for step in range(3, 41):  # λ = |L_FM| / (|L_Cons| + 1e-3) · (step - 1), step counted from 0
        entry = log[step]
        expected = entry["loss_fm"] / (entry["loss_consistency"] + 1e-3) * (step - 1 - 1)
        assert entry["lambda"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("task", ["depth", "normal", "matting"])
@pytest.mark.parametrize("objective", ["paper", "reference"])
def test_every_task_and_objective_trains(tmp_path, task, objective):
    setup = write_tiny_setup(tmp_path / "setup", task, samples=2, side=32)
    config = tiny_config(setup, task, tmp_path / "run", max_steps=2, objective=objective, lambda_start_epoch=0.0,
                         multi_res_noise=objective == "paper", gradient_accumulation_steps=2, batch_size=1)
    result = train(config)
    log = read_log(tmp_path / "run")
    assert sorted(log) == [1, 2]
    assert all(math.isfinite(entry["loss"]) for entry in log.values())
    if objective == "paper":  # λ = 0 at step 0 (the decoder is skipped), then the consistency loss joins
        assert log[1]["lambda"] == 0 and "loss_consistency" not in log[1]
        assert log[2]["lambda"] > 0 and math.isfinite(log[2]["loss_consistency"])
    else:  # the released code's objective: the consistency loss alone, from the first step
        assert all(entry["loss"] == pytest.approx(entry["loss_consistency"]) for entry in log.values())
    trained = [p for name, p in result.transformer.named_parameters() if "lora_B" in name]
    assert any(p.abs().max() > 0 for p in trained)  # the zero-initialised B moved: gradients reached the LoRA


def test_validation_logs_engine_metrics_and_images(tmp_path):
    setup = write_tiny_setup(tmp_path / "setup", "normal", samples=2)
    validation = [{"kind": "folder", "root": setup["data"]}]
    config = tiny_config(setup, "normal", tmp_path / "run", max_steps=2, validation_datasets=validation,
                         validation_samples=2, validation_steps=1, report_to="tensorboard")
    train(config)
    entries = [json.loads(line) for line in (tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines()]
    validations = [entry for entry in entries if "val/mean" in entry]
    assert [entry["step"] for entry in validations] == [1, 2]
    assert all(0 <= entry["val/mean"] <= 180 and 0 <= entry["val/below_30"] <= 100 for entry in validations)
    events = list((tmp_path / "run" / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 1000  # scalars and the validation panels


def test_tensorboard_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as when it is not installed
    setup = write_tiny_setup(tmp_path / "setup", "depth", samples=2)
    with pytest.raises(InputError, match="pip install tensorboard"):
        train(tiny_config(setup, "depth", tmp_path / "run", report_to="tensorboard"))


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_bf16_mixed_precision_trains_and_exports_bf16(tmp_path, mode):
    """The GPU default: frozen weights in bf16 under autocast (bf16 timesteps, bf16-rounded sinusoid)."""
    setup = write_tiny_setup(tmp_path / "setup", "matting", samples=2)
    result = train(tiny_config(setup, "matting", tmp_path / "run", max_steps=2, mixed_precision="bf16",
                               export_dtype="bf16", mode=mode, lambda_start_epoch=0.0))
    log = read_log(tmp_path / "run")
    assert all(math.isfinite(entry["loss"]) for entry in log.values()) and "loss_consistency" in log[2]
    trained = {p.dtype for p in result.transformer.parameters() if p.requires_grad}
    assert trained == ({torch.float32} if mode == "lora" else {torch.bfloat16})  # --trainable-dtype auto
    exported = load_file(result.export_path)
    assert {tensor.dtype for key, tensor in exported.items() if not key.endswith(".alpha")} == {torch.bfloat16}
