"""Checkpoints that survive a kill at any moment: written to a hidden temporary folder, synced, then renamed.

A checkpoint folder ``checkpoints/step-0001200`` holds accelerate's state (optimizer, LR scheduler, RNG states of
every process, its step counter; for FSDP/DeepSpeed also the sharded model), ``trainable.safetensors`` (the trainable
parameters: the LoRA, or the whole DiT) and ``trainer_state_<rank>.json`` (step, data position, the timestep
generator). A folder only gets its final name once everything in it is on disk, so resuming from the newest
``step-*`` folder loses at most the steps since that checkpoint.
"""

import base64
import json
import os
import re
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from e2p_core.checkpoints import save_safetensors_atomic, write_atomically
from e2p_core.errors import CheckpointError

from .model import load_trainable_state_dict, trainable_state_dict

CHECKPOINTS = "checkpoints"
TRAINABLE_FILE = "trainable.safetensors"
_STEP_FOLDER = re.compile(r"^step-(\d+)$")


def checkpoint_folder(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step-{step:07d}"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Finished checkpoint folders, oldest first (temporary folders of an interrupted save are ignored)."""
    folder = Path(output_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [(int(m[1]), path) for path in folder.iterdir() if path.is_dir() and (m := _STEP_FOLDER.match(path.name))]
    return [path for _, path in sorted(found)]


def register_trainable_hooks(accelerator: Accelerator) -> None:
    """Make ``save_state``/``load_state`` keep only the trainable parameters (a LoRA checkpoint stays small).

    Under FSDP and DeepSpeed accelerate saves the (sharded) model itself and passes no weights to the hooks.
    """

    def save_hook(models, weights, output_dir):
        if not weights:
            return
        for model in models:
            tensors = trainable_state_dict(accelerator.unwrap_model(model))
            if accelerator.is_main_process:
                save_safetensors_atomic({k: v.to("cpu") for k, v in tensors.items()}, Path(output_dir) / TRAINABLE_FILE)
        weights.clear()

    def load_hook(models, input_dir):
        path = Path(input_dir) / TRAINABLE_FILE
        if models and not path.is_file():
            raise CheckpointError(f"checkpoint {input_dir} has no {TRAINABLE_FILE}: it is incomplete")
        while models:
            load_trainable_state_dict(accelerator.unwrap_model(models.pop()), load_file(path), str(path))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, step: int, state: dict,
                    generator: torch.Generator, keep: int) -> Path:
    """Save everything needed to resume after optimizer step ``step``; keep the newest ``keep`` checkpoints."""
    final = checkpoint_folder(output_dir, step)
    staging = final.with_name(f".{final.name}.tmp")
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)  # left over from a save that was killed
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    trainer_state = {**state, "step": step, "timestep_generator": _encode_state(generator.get_state())}
    write_atomically(staging / f"trainer_state_{accelerator.process_index}.json",
                     lambda tmp: Path(tmp).write_text(json.dumps(trainer_state, indent=1)))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _sync_folder(staging)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        _sync_folder(final.parent)
        for old in complete_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, folder: Path, generator: torch.Generator) -> dict:
    """Restore a checkpoint saved by :func:`save_checkpoint`; returns this process's trainer state."""
    state_file = folder / f"trainer_state_{accelerator.process_index}.json"
    if not state_file.is_file():
        raise CheckpointError(f"{folder} has no {state_file.name}: it was saved by another number of processes or is "
                              f"not a training checkpoint")
    accelerator.load_state(str(folder))
    state = json.loads(state_file.read_text())
    generator.set_state(_decode_state(state.pop("timestep_generator")))
    return state


def _encode_state(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode("ascii")


def _decode_state(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def _sync_folder(folder: Path) -> None:
    """fsync every file below ``folder`` and the folder itself: the data is on disk before the rename."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
