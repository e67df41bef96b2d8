"""Settings of ``python -m train``: one dataclass, filled from a YAML/JSON config file and/or command-line flags.

A config file uses the flag names as keys (``learning_rate`` or ``learning-rate``); flags given on the command
line override it. Datasets are lists of ``{kind, root, list_file, ratio}`` in a file, or repeated
``--dataset kind=hypersim_depth,root=/data/hypersim,ratio=0.9`` flags.
"""

import argparse
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import UnionType
from typing import Any, get_args, get_origin

from e2p_core.errors import InputError, shortened
from e2p_core.targets import DEPTH_SPACES

from .data import DEFAULT_RATIOS, KINDS, TASKS, DatasetSpec
from .step import OBJECTIVES

CHOICES: dict[str, tuple[str, ...]] = {
    "task": TASKS,
    "mode": ("lora", "full"),
    "time_embedding": ("bf16", "exact"),  # train.model.TRAINED_TIME_EMBEDDINGS (not imported: it loads peft)
    "depth_space": DEPTH_SPACES,
    "objective": OBJECTIVES,
    "optimizer": ("adamw", "adamw8bit"),
    "lr_scheduler": ("reference", "constant", "cosine"),
    "mixed_precision": ("no", "bf16"),
    "trainable_dtype": ("auto", "fp32", "bf16"),
    "report_to": ("tensorboard", "none"),
    "export_dtype": ("bf16", "fp32"),
}
REQUIRED = ("base", "vae")


@dataclass
class TrainConfig:
    # what to train
    task: str = "depth"
    output_dir: str = "runs/e2p"
    base: str = ""  # FLUX.1 Kontext DiT: BFL single file, diffusers folder or an E2P checkpoint
    base_config: str | None = None  # diffusers-style config.json for non-FLUX sizes
    vae: str = ""  # Flux ae.safetensors or a diffusers vae/ folder
    vae_config: str | None = None
    prompt_embeds: str | None = None  # from `python -m e2p_core embed-prompts`
    text_encoders: str | None = None  # or a diffusers FLUX folder to encode the task prompt (cached)
    mode: str = "lora"  # lora | full
    lora_rank: int = 64
    lora_alpha: float | None = None  # default: the rank (scale 1), as the reference
    time_embedding: str = "bf16"  # the sinusoid the weights are trained (and must be run) with: bf16 | exact
    # data
    datasets: list[dict[str, Any]] = field(default_factory=list)
    validation_datasets: list[dict[str, Any]] = field(default_factory=list)
    height: int = 512
    width: int = 512
    depth_space: str = "sqrt"
    binarize_alpha: bool = True
    num_workers: int = 4
    # objective
    objective: str = "paper"  # paper: L_FM + λ L_Cons | reference: the released code's consistency loss only
    lambda_start_epoch: float = 1.0
    multi_res_noise: bool = True
    noise_seed: int = 42
    # optimisation
    batch_size: int = 2
    gradient_accumulation_steps: int = 1
    max_steps: int | None = 6000  # the paper: about 6000 steps
    num_epochs: float | None = None  # alternative to max_steps
    learning_rate: float = 3e-5
    optimizer: str = "adamw"
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_scheduler: str = "reference"  # reference: torch ConstantLR (1/3 for 5 steps) | constant | cosine
    lr_warmup_steps: int = 0
    max_grad_norm: float | None = None
    mixed_precision: str = "bf16"
    trainable_dtype: str = "auto"  # auto: fp32 LoRA, bf16 full fine-tune under bf16 (as the reference)
    gradient_checkpointing: bool = True
    seed: int = 0
    cpu: bool = False
    # bookkeeping
    checkpointing_steps: int = 200
    checkpoints_total_limit: int = 3
    resume: str = "latest"  # latest | none | a checkpoint folder
    validation_steps: int = 200
    validation_samples: int = 4
    log_steps: int = 10
    report_to: str = "tensorboard"  # tensorboard | none (a JSONL log is always written)
    export_dtype: str = "bf16"

    def dataset_specs(self, validation: bool = False) -> list[DatasetSpec]:
        entries = self.validation_datasets if validation else self.datasets
        defaults = DEFAULT_RATIOS.get(self.task, {})
        return [DatasetSpec(e["kind"], e["root"], e.get("list_file"),
                            float(e.get("ratio", defaults.get(e["kind"], 1.0)))) for e in entries]

    def validate(self) -> None:
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise InputError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        for name in REQUIRED:
            if not getattr(self, name):
                raise InputError(f"--{name} is required")
        if not self.prompt_embeds and not self.text_encoders:
            raise InputError("give --prompt-embeds (from `python -m e2p_core embed-prompts`) or --text-encoders")
        if not self.datasets:
            raise InputError("give at least one --dataset kind=KIND,root=FOLDER")
        for entry in [*self.datasets, *self.validation_datasets]:
            if not isinstance(entry, dict) or "kind" not in entry or "root" not in entry:
                raise InputError(f"a dataset needs a kind and a root, got {entry!r}")
            if entry["kind"] not in KINDS:
                raise InputError(f"unknown dataset kind {entry['kind']!r}; expected one of {list(KINDS)}")
            if not isinstance(entry["root"], str) or not isinstance(entry.get("list_file", ""), (str, type(None))):
                raise InputError(f"a dataset's root and list_file are paths, got {entry!r}")
            if "ratio" in entry and not (_has_type(entry["ratio"], float) and entry["ratio"] > 0):
                raise InputError(f"a dataset's ratio is a positive number, got {entry['ratio']!r}")
        if self.height % 16 or self.width % 16 or min(self.height, self.width) < 16:
            raise InputError(f"--height {self.height} and --width {self.width} must be positive multiples of 16 "
                             f"(2x2 latent patches of the 8x VAE)")
        if (self.max_steps is None) == (self.num_epochs is None):
            raise InputError("give exactly one of max_steps and num_epochs")
        if self.max_steps is not None and self.max_steps < 1:
            raise InputError(f"max_steps must be at least 1, got {self.max_steps}")
        if self.num_epochs is not None and self.num_epochs <= 0:
            raise InputError(f"num_epochs must be positive, got {self.num_epochs}")
        positive = ("batch_size", "gradient_accumulation_steps", "lora_rank", "checkpointing_steps", "log_steps",
                    "validation_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


_HELP = {
    "task": "what to learn: depth, normal or matting",
    "output_dir": "run folder: checkpoints/, logs/, train_config.json and the exported weights",
    "base": "base DiT: FLUX.1 Kontext BFL/ComfyUI single file, diffusers folder, or an Edit2Perceive checkpoint",
    "base_config": "diffusers-style config.json for the DiT (only for non-FLUX sizes: gives axes_dims_rope)",
    "vae": "Flux VAE: ae.safetensors (BFL) or a diffusers vae/ folder (frozen)",
    "vae_config": "diffusers-style config.json for the VAE (scale, shift, groups) when not Flux's",
    "prompt_embeds": "prompt embeddings of the task caption (safetensors from `python -m e2p_core embed-prompts`)",
    "text_encoders": "diffusers FLUX folder with text_encoder(_2)/tokenizer(_2) to encode the caption instead (cached)",
    "mode": "lora: train a LoRA on the 304 block Linears (modulation included); full: fine-tune the whole DiT",
    "lora_rank": "LoRA rank (the reference: 64)",
    "lora_alpha": "LoRA alpha (default: the rank, i.e. scale 1, as the reference)",
    "time_embedding": "timestep sinusoid to train with and record in the export: bf16 (rounded frequencies, as the "
                      "released weights) or exact (BFL/diffusers/ComfyUI)",
    "dataset": "a training set, repeatable: kind=KIND,root=FOLDER[,list_file=FILE][,ratio=R] (ratio default: the "
               "reference's mixing ratio of that kind, else 1)",
    "validation_dataset": "a validation set, same syntax (its first --validation-samples samples are used)",
    "height": "training height in pixels (multiple of 16)",
    "width": "training width in pixels (multiple of 16)",
    "depth_space": "depth target space: sqrt (released), log (FE2E) or uniform",
    "binarize_alpha": "matting: binarise alpha at 0.5 as the paper (--no-binarize-alpha: the release's soft alpha)",
    "num_workers": "DataLoader worker processes",
    "objective": "paper: L_FM + adaptive-λ consistency (SSI-L1 / angular / region L1); reference: the released "
                 "code's consistency-only loss (SILog+Sobel / degrees÷100 / unknown-band)",
    "lambda_start_epoch": "epochs with λ = 0 before the consistency loss ramps in (the paper: 1)",
    "multi_res_noise": "annealed multi-resolution noise (strength 0.9·t/1000) on top of the fixed-seed Gaussian",
    "noise_seed": "seed of the fixed-seed training noise (re-seeded every step; the reference: 42)",
    "batch_size": "samples per micro-batch per process",
    "gradient_accumulation_steps": "micro-batches per optimizer step",
    "max_steps": "optimizer steps to train (the paper: about 6000)",
    "num_epochs": "train this many epochs instead of --max-steps (an epoch = the sampler's batches)",
    "learning_rate": "peak learning rate (the paper: 3e-5)",
    "optimizer": "adamw (torch) or adamw8bit (bitsandbytes)",
    "weight_decay": "AdamW weight decay (the reference: 0.01)",
    "adam_beta1": "AdamW beta1", "adam_beta2": "AdamW beta2", "adam_epsilon": "AdamW epsilon",
    "lr_scheduler": "reference: torch ConstantLR (lr/3 for 5 steps, then lr); constant or cosine (with warm-up)",
    "lr_warmup_steps": "linear warm-up steps of the constant/cosine schedules",
    "max_grad_norm": "clip gradients to this norm (default: no clipping, as the reference; DeepSpeed clips itself)",
    "mixed_precision": "bf16 (autocast; frozen weights stored in bf16) or no (float32 everywhere)",
    "trainable_dtype": "dtype of the trained parameters: auto (fp32 LoRA; bf16 full fine-tune under bf16), fp32, bf16",
    "gradient_checkpointing": "recompute DiT blocks (and VAE decoder blocks) in the backward pass to save memory",
    "seed": "seed of the LoRA init, the timestep draws and the data order",
    "cpu": "force the CPU even when a GPU is present",
    "checkpointing_steps": "save a resumable checkpoint every N optimizer steps",
    "checkpoints_total_limit": "keep this many newest checkpoints (0: keep all)",
    "resume": "latest (the newest checkpoint of --output-dir, if any), none, or a checkpoint folder",
    "validation_steps": "validate every N steps (needs --validation-dataset)",
    "validation_samples": "how many validation samples to predict and log",
    "log_steps": "log losses every N steps",
    "report_to": "tensorboard (needs `pip install tensorboard`) or none; logs/metrics.jsonl is always written",
    "export_dtype": "dtype of the exported LoRA / DiT",
}


def _parse_dataset(text: str) -> dict[str, Any]:
    entry: dict[str, Any] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in ("kind", "root", "list_file", "ratio"):
            raise argparse.ArgumentTypeError(f"dataset {text!r}: expected "
                                             f"kind=KIND,root=FOLDER[,list_file=F][,ratio=R]")
        entry[key.strip()] = float(value) if key.strip() == "ratio" else value
    return entry


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description="Fine-tune FLUX.1 Kontext into an Edit2Perceive perceiver (depth, normals or matting). Run it "
                    "with `accelerate launch --config_file train/configs/<engine>.yaml -m train ...` for multi-GPU, "
                    "FSDP or DeepSpeed; plain `python -m train` uses one device.",
    )
    parser.add_argument("--config", help="YAML or JSON file with any of the settings below (flags override it)")
    for item in fields(TrainConfig):
        flag = "--" + item.name.replace("_", "-")
        if item.name in ("datasets", "validation_datasets"):
            singular = item.name[:-1]
            parser.add_argument("--" + singular.replace("_", "-"), dest=item.name, action="append",
                                type=_parse_dataset, default=None, help=_HELP[singular])
            continue
        help_text = _HELP[item.name]
        if item.name in REQUIRED:
            help_text += " (required)"
        elif item.default is not None and "default" not in help_text:
            help_text += f" (default: {item.default})"
        if isinstance(item.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        kind = int if "int" in str(item.type) else float if "float" in str(item.type) else str
        parser.add_argument(flag, type=kind, default=None, choices=CHOICES.get(item.name), help=help_text)
    return parser


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config file {path} not found")
    is_yaml = path.suffix.lower() in (".yaml", ".yml")
    try:
        text = path.read_text(encoding="utf-8")
        if is_yaml:
            import yaml  # only needed for YAML configs

            try:
                values = yaml.safe_load(text) or {}
            except yaml.YAMLError as exc:
                raise ValueError(str(exc)) from None
        else:
            values = json.loads(text)
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON/YAML, absurd numbers or nesting
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise InputError(f"config file {path} is not valid {'YAML' if is_yaml else 'JSON'}: {reason}") from None
    if not isinstance(values, dict) or not all(isinstance(key, str) for key in values):
        raise InputError(f"config file {path} must hold a mapping of setting names to values")
    types = {item.name: item.type for item in fields(TrainConfig)}
    normalised = {key.replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(set(normalised) - set(types))
    if unknown:
        raise InputError(f"config file {path}: unknown settings {unknown}")
    for name, value in normalised.items():
        if not _has_type(value, types[name]):
            raise InputError(f"config file {path}: {name} is {shortened(value)}; expected {_type_name(types[name])}")
    return normalised


def _has_type(value: Any, annotation: Any) -> bool:
    """Whether a config file's ``value`` fits a TrainConfig field's type annotation."""
    allowed = get_args(annotation) if isinstance(annotation, UnionType) else (annotation,)
    return any(_is_a(value, get_origin(kind) or kind) for kind in allowed)


def _is_a(value: Any, kind: type) -> bool:
    if kind is type(None):
        return value is None
    if isinstance(value, bool):  # an int subclass in Python, never a number in a config
        return kind is bool
    if kind in (int, float) and isinstance(value, int):
        return abs(value) < 2**63
    if kind is float:
        return isinstance(value, float) and math.isfinite(value)
    if kind is list:
        return isinstance(value, list) and all(isinstance(entry, dict) for entry in value)
    return isinstance(value, kind)


def _type_name(annotation: Any) -> str:
    names = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false",
             list: "a list of {kind, root, ...} mappings", type(None): "null"}
    allowed = get_args(annotation) if isinstance(annotation, UnionType) else (annotation,)
    return " or ".join(names[get_origin(kind) or kind] for kind in allowed)


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Config file values, overridden by the flags given; validated."""
    args = build_parser().parse_args(argv)
    values = load_config_file(args.config) if args.config else {}
    values.update({key: value for key, value in vars(args).items() if key != "config" and value is not None})
    if values.get("num_epochs") is not None and "max_steps" not in values:
        values["max_steps"] = None  # epochs replace the default step count
    config = TrainConfig(**values)
    config.validate()
    return config
