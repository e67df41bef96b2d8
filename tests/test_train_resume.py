"""Checkpoint and resume: a run killed with SIGKILL and resumed follows exactly the trajectory of a run that was
never interrupted (same losses at every step, same final weights)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from train.checkpoint import TRAINABLE_FILE, complete_checkpoints
from train.config import TrainConfig
from train.trainer import RunLog
from train_support.runs import read_log, tiny_config, write_tiny_setup

REPO = Path(__file__).parent.parent
STEPS = 16


def start_run(config_file: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "train", "--config", str(config_file)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def write_config(setup: dict, output_dir: Path) -> Path:
    # 3 samples, batch 2: an epoch is 1 batch, so the run crosses many epochs (and the λ ramp) after the resume
    config = tiny_config(setup, "depth", output_dir, max_steps=STEPS, checkpointing_steps=3,
                         checkpoints_total_limit=2, lambda_start_epoch=4.0, gradient_accumulation_steps=2)
    path = output_dir.parent / f"{output_dir.name}.json"
    path.write_text(config.to_json())
    return path


def test_a_run_killed_after_a_checkpoint_resumes_on_the_same_trajectory(tmp_path):
    setup = write_tiny_setup(tmp_path / "setup", "depth", samples=3)
    reference_config = write_config(setup, tmp_path / "uninterrupted")
    killed_config = write_config(setup, tmp_path / "killed")

    process = start_run(killed_config)
    deadline = time.monotonic() + 120
    while not complete_checkpoints(tmp_path / "killed") and time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be killed"
    time.sleep(0.5)  # somewhere in the middle of the next steps, possibly inside a checkpoint write
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = max(read_log(tmp_path / "killed"))
    assert killed_at < STEPS

    reference = start_run(reference_config)
    resumed = start_run(killed_config)  # --resume latest is the default
    for run in (reference, resumed):
        _, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr
    assert "resumed from" in stderr

    expected, got = read_log(tmp_path / "uninterrupted"), read_log(tmp_path / "killed")
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    for step in expected:
        for key in ("loss", "loss_fm", "lambda", "lr"):
            assert got[step][key] == expected[step][key], (step, key)
    final = [load_file(complete_checkpoints(tmp_path / run)[-1] / TRAINABLE_FILE) for run in ("uninterrupted",
                                                                                             "killed")]
    assert final[0].keys() == final[1].keys()
    for key in final[0]:
        assert torch.equal(final[0][key], final[1][key]), key
    assert len(complete_checkpoints(tmp_path / "killed")) == 2  # older checkpoints are pruned
    exported = [load_file(tmp_path / run / "depth_lora.safetensors") for run in ("uninterrupted", "killed")]
    assert all(torch.equal(exported[0][key], exported[1][key]) for key in exported[0])
    state = json.loads((complete_checkpoints(tmp_path / "killed")[-1] / "trainer_state_0.json").read_text())
    assert state["step"] == STEPS and state["micro_batch_position"] == STEPS * 2


def test_only_finished_checkpoint_folders_count(tmp_path):
    folder = tmp_path / "checkpoints"
    for name in ("step-0000010", "step-0000002", ".step-0000012.tmp", "notes"):
        (folder / name).mkdir(parents=True)
    assert [path.name for path in complete_checkpoints(tmp_path)] == ["step-0000002", "step-0000010"]


def test_a_resumed_log_drops_later_steps_and_a_line_cut_short_by_the_kill(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    lines = [json.dumps({"step": step, "loss": 1.0 / step}) for step in (1, 2, 3)]
    (logs / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 4, "lo')
    RunLog(TrainConfig(output_dir=str(tmp_path), report_to="none"), enabled=True).open(start_step=2)
    assert (logs / "metrics.jsonl").read_text().splitlines() == lines[:2]
