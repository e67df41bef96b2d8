"""Command-line options shared by the commands that run a model (``predict``, ``evaluate``), and the loading they
describe: the DiT (+ LoRAs, GGUF, memory mode), the VAE, the task prompt, the device and the compute dtype."""

import argparse
import os
from pathlib import Path

import torch

from .backends.base import Denoiser, LatentCodec
from .backends.memory import MEMORY_MODES
from .checkpoints.io import SAFETENSORS_SUFFIXES
from .errors import InputError
from .hub.command import add_source_arguments, fill_model_paths, store_from_args
from .prompts import PromptEmbeddings, cached_prompt_embeddings, load_prompt_embeddings
from .tasks import MATTING_PROMPT_INFERENCE_PY, TASKS
from .text_encoders import automatic_encoder_source, local_encoder_source
from .time_embedding import AUTO, TIME_EMBEDDING_CHOICES, TIME_EMBEDDING_HELP

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_CACHE_DIR = Path(os.environ.get("E2P_CACHE_DIR", Path.home() / ".cache" / "edit2perceive"))


class TaskScoped(argparse.Action):
    """``VALUE`` for every task, or ``TASK=VALUE`` for one task of a ``--task`` list, kept in ``args.per_task`` as
    ``(dest, task, value)``. A repeatable option (a list default, ``--lora``) appends its plain values."""

    def __call__(self, parser, namespace, value, option_string=None):
        task, sep, task_value = value.partition("=")
        if sep and task in TASKS and not Path(value).exists():
            namespace.per_task = (*namespace.per_task, (self.dest, task, task_value))
        elif isinstance(self.default, list):
            setattr(namespace, self.dest, [*getattr(namespace, self.dest), value])
        else:
            setattr(namespace, self.dest, value)


def add_model_arguments(parser: argparse.ArgumentParser, per_task: bool = False) -> None:
    """The weights, prompt, device, dtype and memory options (the task and the run options are the command's).

    ``per_task``: ``--dit``, ``--lora`` and ``--prompt-embeds`` also take ``TASK=VALUE``, one task's value in a
    multi-task ``predict`` (see ``cli_tasks``)."""
    scoped = {"action": TaskScoped} if per_task else {}
    for_one_task = "; TASK=VALUE (e.g. normal=FILE) for one task of a --task list" if per_task else ""
    if per_task:
        parser.set_defaults(per_task=())
    parser.add_argument("--dit", **scoped,
                        help="base or E2P DiT: BFL/ComfyUI file (fp8 ok), DiffSynth file, city96/ComfyUI-GGUF .gguf, "
                             f"or diffusers folder (default: --weights from disk or the hub){for_one_task}")
    parser.add_argument("--dit-config", help="diffusers-style config.json for non-standard DiT sizes (RoPE axes)")
    parser.add_argument("--lora", action=TaskScoped if per_task else "append", default=[],
                        help=f"task LoRA (kohya/PEFT), PATH or PATH:STRENGTH; repeatable{for_one_task}")
    parser.add_argument("--vae", help="Flux VAE: BFL ae.safetensors or diffusers folder (default: ae.safetensors from "
                                      "disk or the hub)")
    parser.add_argument("--vae-config", help="diffusers-style config.json for a non-standard VAE")
    parser.add_argument("--prompt-embeds", **scoped,
                        help="safetensors with prompt_embeds [1,L,D] and pooled_prompt_embeds [1,P] (embed-prompts); "
                             "default: the task prompt from --cache-dir, else encoded once with --text-encoders or "
                             "the text encoders on disk (--comfyui, --models-dir, HF cache) or from the hub"
                             + for_one_task)
    parser.add_argument("--text-encoders", help="instead of --prompt-embeds: a diffusers FLUX folder, a ComfyUI "
                                                "models/text_encoders folder (clip_l + t5xxl_fp16) or a ComfyUI "
                                                "folder; the encoding is cached")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR),
                        help="prompt-embedding cache (default: %(default)s)")
    parser.add_argument("--matting-prompt", choices=("training", "inference_py"), default="training",
                        help="matting prompt: the training caption (default) or the reference inference.py one")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="compute dtype (default bf16)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--memory-mode", choices=MEMORY_MODES, default="full",
                        help="how the DiT weights are held: full (compute dtype, default), fp8 (fp8 storage, "
                             "~14 GiB), offload (block by block from host memory, 8-12 GB cards), fp8-offload, "
                             "gguf (kept quantised: a .gguf --dit as is, other files Q8_0)")
    parser.add_argument("--time-embedding", choices=TIME_EMBEDDING_CHOICES, default=AUTO,
                        help=f"{TIME_EMBEDDING_HELP} (default: %(default)s)")
    add_source_arguments(parser)


def device_and_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but no CUDA GPU is available")
    return device, DTYPES[args.dtype]


def prompt_text(task: str, matting_prompt: str) -> str:
    return MATTING_PROMPT_INFERENCE_PY if task == "matting" and matting_prompt == "inference_py" else TASKS[task].prompt


def prompt_embeddings(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> PromptEmbeddings:
    """The task prompt from ``--prompt-embeds``, else from the cache in ``--cache-dir``, else encoded once (and
    cached) with ``--text-encoders`` or the text encoders on disk or from the hub (``automatic_encoder_source``)."""
    if args.prompt_embeds:
        return load_prompt_embeddings(args.prompt_embeds).to(device, dtype)
    if args.text_encoders:
        source = local_encoder_source(args.text_encoders)
    else:
        source = automatic_encoder_source(store_from_args(args))
    return cached_prompt_embeddings(prompt_text(args.task, args.matting_prompt), source, args.cache_dir, device, dtype)


def lora_arg(spec: str) -> tuple[str, float]:
    """``PATH`` or ``PATH:STRENGTH``."""
    path, sep, strength = spec.rpartition(":")
    if sep and path and not Path(spec).exists():
        try:
            return path, float(strength)
        except ValueError:
            pass
    return spec, 1.0


def resolution_arg(value: str) -> int | str | tuple[int, int]:
    """An integer processing size, ``native``, or ``WxH`` -> ``(height, width)`` (exactly that size)."""
    if value == "native":
        return value
    width, sep, height = value.lower().partition("x")
    try:
        return (int(height), int(width)) if sep else int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, 'native' or WxH (e.g. 1024x768), got {value!r}"
                                         ) from None


def load_model(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> tuple[Denoiser, LatentCodec, str]:
    """``(denoiser, codec, source_format)`` of the diffusers backend for ``--dit``/``--lora``/``--vae``; the ones not
    given come from the sources table (on disk, else downloaded: ``hub.command.fill_model_paths``)."""
    fill_model_paths(args)
    denoiser, source_format = load_denoiser(args, device, dtype)
    return denoiser, load_codec(args, device, dtype), source_format


def load_denoiser(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[Denoiser, str]:
    """``(denoiser, source_format)`` for ``--dit`` with the ``--lora``s merged (paths filled: ``fill_model_paths``).

    diffusers is imported here, not at module level: only commands that run a model pay for it.
    """
    from .backends.diffusers_backend import load_diffusers_denoiser
    from .weights import load_dit

    loras = [lora_arg(spec) for spec in args.lora]
    suffix = Path(args.dit).suffix.lower()
    if suffix == ".gguf":  # city96 / ComfyUI-GGUF: quantised weights, see backends.gguf
        from .backends.gguf import load_gguf_dit

        dit = load_gguf_dit(args.dit, args.dit_config, loras)
    elif args.memory_mode == "gguf" and suffix in SAFETENSORS_SUFFIXES:  # quantised as it is read: no float model
        from .backends.gguf import quantize_dit_file

        dit = quantize_dit_file(args.dit, args.dit_config, loras, device)
    else:
        dit = load_dit(args.dit, args.dit_config, loras)
    # dit dies with this frame: on a GPU its host copy is freed before the caller runs the model.
    return load_diffusers_denoiser(dit, dtype, device, args.time_embedding, args.memory_mode), dit.source_format


def load_codec(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> LatentCodec:
    """The VAE of ``--vae`` (path filled: ``fill_model_paths``)."""
    from .backends.diffusers_backend import load_diffusers_codec
    from .weights import load_vae

    return load_diffusers_codec(load_vae(args.vae, args.vae_config), dtype, device)
