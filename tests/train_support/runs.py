"""Tiny training runs for the ``python -m train`` tests: the fixture DiT and VAE, synthetic data, CPU float32."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FIXTURES, TINY_DIT_CONFIG
from e2p_core.prompts import PromptEmbeddings, save_prompt_embeddings
from train.config import TrainConfig

from .synthetic import write_synthetic_folder

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
