"""``predict`` on one image, for one task or several (``--task depth,normal,matting``), with ONE VAE encode of it.

The RGB context latent is the same for every task (one VAE, one preprocessing), so the image is encoded once
(``pipeline.encode_image``) and every task's ``perceive`` takes that encode. Each task has its own DiT: the base with
that task's LoRA merged, or that task's full checkpoint. A LoRA is merged into the loaded weights in place, so the base
file is read again for every task; its memory mapping is copy-on-write, so every read starts from the untouched file
(and the page cache makes the second read cheap). Only one DiT is in memory at a time: each is freed before the next
loads. Every file is checked, and every model file found or downloaded, before the first model loads; the outputs are
published together once every task has run.

The options of each task are the plain ones with that task's ``TASK=VALUE`` ones over them (``task_runs``), so each
task's output is exactly what ``predict --task TASK`` with those options writes.
"""

import argparse
import logging
from pathlib import Path

from .cli_models import device_and_dtype, load_codec, load_denoiser, prompt_embeddings
from .cli_inputs import point_prompt, read_tensor_file
from .cli_outputs import check_output_path, output_writers, publish
from .errors import InputError
from .hub.command import fill_model_paths
from .images import load_image_rgb
from .pipeline import encode_image, perceive
from .tasks import TASKS

logger = logging.getLogger("e2p_core")


def task_list(value: str) -> tuple[str, ...]:
    """``--task``: one task, or a comma list of different tasks (``depth,normal,matting``)."""
    names = tuple(name.strip() for name in value.split(","))
    for name in names:
        if name not in TASKS:
            raise argparse.ArgumentTypeError(f"unknown task {name!r}; expected {', '.join(sorted(TASKS))} or a "
                                             f"comma list of them")
    if len(set(names)) < len(names):
        raise argparse.ArgumentTypeError(f"{value!r} names a task twice")
    return names


def task_runs(args: argparse.Namespace) -> list[argparse.Namespace]:
    """The options of each task of ``--task``: the plain ones with the task's ``TASK=VALUE`` ones over them (its
    ``--lora``s come after the plain ones), and ``{task}`` in ``--out``/``--raw`` replaced by its name."""
    for _, task, _ in args.per_task:
        if task not in args.task:
            raise InputError(f"{task}=... is given, but {task} is not in --task {','.join(args.task)}")
    runs = []
    for task in args.task:
        options = {"task": task, "lora": list(args.lora), "out": args.out.replace("{task}", task),
                   "raw": args.raw and args.raw.replace("{task}", task), "per_task": ()}
        for dest, scoped_task, value in args.per_task:
            if scoped_task == task:
                options[dest] = [*options[dest], value] if dest == "lora" else value
        runs.append(argparse.Namespace(**{**vars(args), **options}))
    return runs


def predict_tasks(runs: list[argparse.Namespace]) -> None:
    """Run every task of ``runs`` (from :func:`task_runs`: one or more) on one image and one encode of it. Every
    input is read and checked before a model loads, so a typo costs nothing and writes nothing."""
    shared, tasks = runs[0], ",".join(run.task for run in runs)  # shared: the options all tasks have in common
    _check_outputs(runs)
    prompt_files = [run.prompt_embeds for run in runs if run.prompt_embeds]
    if len(set(prompt_files)) < len(prompt_files):
        raise InputError(f"--task {tasks}: two tasks would get the same --prompt-embeds; give each task its own as "
                         f"TASK=FILE (or none: the task prompts come from the cache)")
    image = load_image_rgb(shared.image)
    points, point_map = point_prompt(shared, image.shape[:2])
    if (points is not None or point_map is not None) and not any(TASKS[run.task].uses_point_map for run in runs):
        raise InputError(f"a point prompt is for matting, and --task {tasks} has no matting")
    noise = read_tensor_file(shared.noise, "noise") if shared.noise else None
    device, dtype = device_and_dtype(shared)
    prompts = [prompt_embeddings(run, device, dtype) for run in runs]
    for run in runs:  # every model file on disk (downloaded if missing) before any model loads; one VAE for all
        run.vae = shared.vae
        fill_model_paths(run)

    codec = load_codec(shared, device, dtype)
    encoded = encode_image(codec, image, resize=shared.resize, resolution=shared.resolution)
    writers = {}
    for run, prompt in zip(runs, prompts):
        denoiser, source_format = load_denoiser(run, device, dtype)
        logger.info("%s: DiT %s (%s naming) + %d LoRA(s)", run.task, Path(run.dit).name, source_format, len(run.lora))
        takes_points = TASKS[run.task].uses_point_map
        result = perceive(
            denoiser, codec, image, run.task, prompt,
            points=points if takes_points else None, point_map=point_map if takes_points else None,
            steps=run.steps, seed=run.seed, noise=noise, resize=run.resize, resolution=run.resolution,
            encoded=encoded, on_step=lambda i, n: logger.info("step %d/%d", i + 1, n),
        )
        del denoiser  # one DiT in memory at a time: this one goes before the next task's loads
        writers.update(output_writers(run, result))
    publish(writers)


def _check_outputs(runs: list[argparse.Namespace]) -> None:
    """Every task writes its own files: ``{task}`` in ``--out`` (and ``--raw``) names them."""
    for flag, suffixes, example in (("out", (".png", ".npy"), "maps/photo_{task}.png"),
                                    ("raw", (".safetensors",), "raw_{task}.safetensors")):
        paths = [getattr(run, flag) for run in runs]
        if paths[0] is None:
            continue
        if len(set(paths)) < len(paths):
            raise InputError(f"--{flag} {paths[0]}: several tasks write one file each; put {{task}} in the name "
                             f"(e.g. {example})")
        for path in paths:
            check_output_path(path, suffixes, f"--{flag}")
