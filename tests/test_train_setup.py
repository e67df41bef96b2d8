"""The config layer of ``python -m train``: file + flags precedence, the help text, the shipped configs."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from e2p_core.errors import InputError
from train.config import TrainConfig, parse_config

REPO = Path(__file__).parent.parent


def test_config_file_values_are_overridden_by_flags(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("task: normal\nlearning-rate: 1.0e-4\nbase: dit.safetensors\nvae: ae.safetensors\n"
                           "prompt_embeds: p.safetensors\ndatasets:\n  - {kind: hypersim_normal, root: /data/hs}\n"
                           "  - {kind: folder, root: /data/mine, ratio: 2}\n")
    config = parse_config(["--config", str(config_file), "--learning-rate", "2e-5", "--no-multi-res-noise",
                           "--max-steps", "10"])
    assert (config.task, config.learning_rate, config.multi_res_noise, config.max_steps) == ("normal", 2e-5, False, 10)
    specs = config.dataset_specs()
    assert [(s.kind, s.ratio) for s in specs] == [("hypersim_normal", 0.5), ("folder", 2.0)]  # reference ratio


def test_config_errors_name_the_setting(tmp_path):
    base = ["--base", "d", "--vae", "v", "--prompt-embeds", "p", "--dataset", "kind=folder,root=x"]
    with pytest.raises(InputError, match="height"):
        parse_config([*base, "--height", "500"])
    (tmp_path / "sgd.json").write_text(json.dumps({"optimizer": "sgd"}))
    with pytest.raises(InputError, match="optimizer must be one of"):  # argparse checks flags, validate() files
        parse_config([*base, "--config", str(tmp_path / "sgd.json")])
    with pytest.raises(InputError, match="unknown settings"):
        (tmp_path / "bad.json").write_text(json.dumps({"learning_rat": 1}))
        parse_config(["--config", str(tmp_path / "bad.json")])
    epochs = parse_config([*base, "--num-epochs", "2"])
    assert epochs.max_steps is None and epochs.num_epochs == 2
    with pytest.raises(InputError, match="max_steps must be at least 1, got 0"):
        parse_config([*base, "--max-steps", "0"])
    with pytest.raises(InputError, match="num_epochs must be positive"):
        parse_config([*base, "--num-epochs", "0"])


def test_help_documents_every_setting():
    result = subprocess.run([sys.executable, "-m", "train", "--help"], cwd=REPO, capture_output=True, text=True,
                            check=True)
    for flag in ("--task", "--base", "--mode", "--lora-rank", "--objective", "--multi-res-noise", "--optimizer",
                 "--lr-scheduler", "--gradient-accumulation-steps", "--resume", "--dataset", "--time-embedding",
                 "--report-to", "--checkpointing-steps", "accelerate launch"):
        assert flag in result.stdout


@pytest.mark.parametrize("name", ["depth_lora", "normal_lora", "matting_lora", "depth_full"])
def test_shipped_training_configs_are_valid(name):
    config = parse_config(["--config", str(REPO / "train" / "configs" / f"{name}.yaml")])
    assert config.task == name.split("_")[0] and config.mode == name.split("_")[1]
    assert config.dataset_specs() and config.height % 16 == 0


@pytest.mark.parametrize("name, engine", [("accelerate_single_gpu", "NO"), ("accelerate_multi_gpu", "MULTI_GPU"),
                                          ("accelerate_fsdp", "FSDP"), ("accelerate_deepspeed_zero2", "DEEPSPEED")])
def test_shipped_accelerate_configs_load_in_accelerate(name, engine):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(REPO / "train" / "configs" / f"{name}.yaml")
    assert config.distributed_type == engine and config.mixed_precision == "bf16"


def test_8bit_adamw_without_bitsandbytes_says_how_to_get_it(monkeypatch):
    from train.trainer import make_optimizer

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as on a machine without it
    with pytest.raises(InputError, match="pip install bitsandbytes"):
        make_optimizer(TrainConfig(optimizer="adamw8bit"), [torch.nn.Parameter(torch.zeros(2))])


def test_cli_reports_bad_settings_in_one_line():
    result = subprocess.run([sys.executable, "-m", "train", "--task", "depth", "--vae", "ae.safetensors"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --base is required"


@pytest.mark.parametrize("name, expected", [
    ("reference", [1 / 3] * 5 + [1.0] * 5),  # torch ConstantLR defaults, stepped every iteration (the reference)
    ("constant", [0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),  # 2 warm-up steps
    ("cosine", [0.0, 0.5] + [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]),
])
def test_learning_rate_schedules(name, expected):
    from train.trainer import make_scheduler

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    scheduler = make_scheduler(TrainConfig(lr_scheduler=name, lr_warmup_steps=2), optimizer, max_steps=10)
    rates = []
    for _ in range(10):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx(expected)


@pytest.mark.parametrize("missing", ["base", "data"])
def test_a_missing_input_fails_before_the_run_folder_is_made(tmp_path, missing):
    """A typo in a path is reported with the file's name and leaves no run folder (no stray train_config.json)."""
    from e2p_core.errors import E2PError
    from train.trainer import train
    from train_support.runs import tiny_config, write_tiny_setup

    setup = write_tiny_setup(tmp_path / "setup", "depth", samples=2)
    if missing == "data":
        setup["data"] = str(tmp_path / "no_such_dataset")
    overrides = {"base": str(tmp_path / "no_such_dit.safetensors")} if missing == "base" else {}
    with pytest.raises(E2PError, match="no_such"):
        train(tiny_config(setup, "depth", tmp_path / "run", **overrides))
    assert not (tmp_path / "run").exists()
