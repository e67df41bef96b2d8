"""The command line's side of the hub: ``python -m e2p_core download``, and the model files ``predict``/``evaluate``
take from the sources table when no path is given.

    python -m e2p_core download --task depth    # Kontext base + depth LoRA + VAE + text encoders -> the HF cache
    python -m e2p_core download --task all --weights full --comfyui ~/ComfyUI   # into ComfyUI/models/<folder>/
    python -m e2p_core download --task depth --to models/ --dry-run             # what would come, and how big
"""

import argparse
import logging

from ..tasks import TASKS
from .fetch import Store, find_local, resolve_all
from .sources import (
    BASE_CHOICES,
    FE2E_MODEL_KEYS,
    TEXT_ENCODER_KEYS,
    WEIGHTS_CHOICES,
    format_bytes,
    model_file,
    task_model_keys,
)

logger = logging.getLogger("e2p_core")


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """Which table files to use (``--weights``, ``--base``) and where they live (``--comfyui`` / ``--models-dir``)."""
    parser.add_argument("--weights", choices=WEIGHTS_CHOICES, default="lora",
                        help="without --dit: lora = FLUX.1 Kontext [dev] base + the task LoRA (default), full = the "
                             "task's Edit2Perceive checkpoint (23.8 GB each)")
    parser.add_argument("--base", choices=sorted(BASE_CHOICES), default="bf16",
                        help="Kontext base for --weights lora: bf16 (23.8 GB, gated: accept the licence and log in) "
                             "or fp8 (ComfyUI's ungated scaled-fp8 repack, 11.9 GB; not bit-identical)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--comfyui", metavar="COMFYUI_DIR",
                       help="look for (and download) model files in COMFYUI_DIR/models/<folder>/")
    where.add_argument("--models-dir", "--to", dest="models_dir", metavar="DIR",
                       help="look for (and download) model files in DIR (default: the Hugging Face cache)")


def store_from_args(args: argparse.Namespace) -> Store:
    if args.comfyui:
        return Store.comfyui(args.comfyui)
    if args.models_dir:
        return Store.directory(args.models_dir)
    return Store()


def fill_model_paths(args: argparse.Namespace) -> None:
    """Set ``args.dit`` / ``args.lora`` / ``args.vae`` from the sources table where the user gave no path.

    Explicit paths always win and are never checked against the hub. ``--dit`` given: no LoRA is added (pass
    ``--lora``); no ``--dit``: the ``--weights`` choice decides, and a LoRA given with ``--lora`` replaces the task's.
    Files on disk are used as they are; missing ones are downloaded unless HF_HUB_OFFLINE is set.
    """
    wanted = {}
    if not args.dit:
        keys = task_model_keys(args.task, args.weights, args.base)
        wanted["dit"] = keys[0]
        if args.weights == "lora" and not args.lora:
            wanted["lora"] = keys[1]
    if not args.vae:
        wanted["vae"] = "vae"
    if not wanted:
        return
    paths = resolve_all(wanted.values(), store_from_args(args))
    for role, key in wanted.items():
        logger.info("%s: %s", role, paths[key])
    args.dit = str(paths[wanted["dit"]]) if "dit" in wanted else args.dit
    args.vae = str(paths["vae"]) if "vae" in wanted else args.vae
    if "lora" in wanted:
        args.lora = [str(paths[wanted["lora"]])]


# -------------------------------------------------------------------------------------------------------- download


def download(args: argparse.Namespace) -> None:
    if args.task == "fe2e":  # FE2E runs from a cached prompt embedding: no text encoders
        keys = list(FE2E_MODEL_KEYS)
    else:
        tasks = sorted(TASKS) if args.task == "all" else [args.task]
        keys = [key for task in tasks for key in task_model_keys(task, args.weights, args.base)]
        if not args.no_text_encoders:
            keys += TEXT_ENCODER_KEYS
    keys = list(dict.fromkeys(keys))
    store = store_from_args(args)
    found = {key: find_local(key, store) for key in keys}
    for key in keys:
        file = model_file(key)
        state = f"present: {found[key]}" if found[key] else f"to download, {file.size_text}"
        source = file.hub.repo + (f" (or {file.ungated_copy.repo})" if file.ungated_copy else "")
        print(f"{file.name:50s} {source:40s} {state}")
    missing_bytes = sum(model_file(key).approx_bytes for key in keys if not found[key])
    print(f"{sum(1 for key in keys if not found[key])} file(s) to download, about {format_bytes(missing_bytes)}")
    if args.dry_run:
        return
    paths = resolve_all(keys, store, copy_into_store=True)
    for key in keys:
        print(f"{model_file(key).name}: {paths[key]}")


def add_download_parser(commands) -> None:
    d = commands.add_parser("download", help="fetch the model files of a task from the Hugging Face hub",
                            description=__doc__.split("\n\n")[0])
    d.add_argument("--task", required=True, choices=[*sorted(TASKS), "all", "fe2e"],
                   help="which task's files (or all); fe2e: Step1X-Edit + its VAE + FE2E's LoRA (no_info.npz comes "
                        "from the FE2E GitHub repository, latent/no_info.npz)")
    add_source_arguments(d)
    d.add_argument("--no-text-encoders", action="store_true",
                   help="skip CLIP-L + T5-XXL and their tokenizers (10 GB; needed once, to encode the task prompts)")
    d.add_argument("--dry-run", action="store_true", help="only list the files, where they are and their sizes")
    d.set_defaults(run=download)
