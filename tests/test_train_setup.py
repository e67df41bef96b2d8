"""Tiny training runs for the ``python -m train`` tests (the fixture DiT and VAE, synthetic data), and the config
layer: file + flags precedence and the help text."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FIXTURES, TINY_DIT_CONFIG
from e2p_core.errors import InputError
from e2p_core.prompts import PromptEmbeddings, save_prompt_embeddings
from train.config import TrainConfig, parse_config
from train_support.synthetic import write_synthetic_folder

REPO = Path(__file__).parent.parent
TEXT_TOKENS = 32  # the fixture's random "T5" embeddings, shortened: the tiny DiT takes any length, and it is faster


def write_tiny_setup(root: Path, task: str, samples: int = 4, side: int = 32) -> dict[str, str]:
    """Prompt embeddings, the tiny DiT's config.json and a synthetic ``folder`` dataset under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    inputs = np.load(FIXTURES / "inputs.npz")
    prompt = PromptEmbeddings(torch.from_numpy(inputs[f"{task}_t5_emb"][:, :TEXT_TOKENS]),
                              torch.from_numpy(inputs[f"{task}_pooled_emb"]))
    save_prompt_embeddings(prompt, root / "prompt.safetensors")
    (root / "dit_config.json").write_text(json.dumps(TINY_DIT_CONFIG))
    write_synthetic_folder(root / "data", task, samples, (side, side), seed=0)
    return {"root": str(root), "prompt": str(root / "prompt.safetensors"), "dit_config": str(root / "dit_config.json"),
            "data": str(root / "data"), "side": side}


def tiny_config(setup: dict, task: str, output_dir: Path, **overrides) -> TrainConfig:
    """Settings for a few CPU steps of the tiny model in float32 (exactly reproducible)."""
    values = dict(
        task=task, output_dir=str(output_dir), base=str(FIXTURES / "dit_bfl.safetensors"),
        base_config=setup["dit_config"], vae=str(FIXTURES / "vae_bfl.safetensors"), prompt_embeds=setup["prompt"],
        datasets=[{"kind": "folder", "root": setup["data"]}], height=setup["side"], width=setup["side"],
        num_workers=0, batch_size=2, max_steps=4, learning_rate=1e-3, mixed_precision="no", cpu=True,
        checkpointing_steps=1000, log_steps=1, report_to="none", lora_rank=4, export_dtype="fp32",
    )
    values.update(overrides)
    config = TrainConfig(**values)
    config.validate()
    return config


def read_log(output_dir: Path) -> dict[int, dict]:
    """The training entries of logs/metrics.jsonl as {step: losses}; every step is logged once."""
    entries = [json.loads(line) for line in (output_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    training = [entry for entry in entries if "loss" in entry]
    assert len({entry["step"] for entry in training}) == len(training), "a step was logged twice"
    return {entry["step"]: entry for entry in training}


@pytest.fixture
def one_thread():
    """For in-process training runs: one thread (the tiny model is far faster so when the machine is shared), and
    accelerate's process-wide state cleared before and after (as accelerate's own test case does), so each run may
    choose its own mixed precision; the thread count is restored afterwards."""
    from accelerate.state import AcceleratorState

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    torch.set_num_threads(threads)
    AcceleratorState._reset_state(reset_partial_state=True)


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
