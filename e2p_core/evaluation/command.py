"""``python -m e2p_core evaluate``: run a model over benchmark suites and write the paper-style report.

    python -m e2p_core evaluate --task depth --suite nyuv2 --data-root nyuv2/nyu_labeled_extracted.tar \\
        --suite kitti --data-root kitti/kitti_eigen_split_test.tar --dit flux1-kontext-dev.safetensors \\
        --lora depth_lora.safetensors --vae ae.safetensors --prompt-embeds depth.safetensors --out-dir eval/depth

Each ``--suite`` takes the ``--data-root`` (folder or tar) and the optional ``--list-file`` given at the same position.
The model is loaded as ``predict`` loads it, through the command line's own helpers.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..cli_models import (
    add_model_arguments,
    device_and_dtype,
    load_model,
    lora_arg,
    prompt_embeddings,
    prompt_text,
    resolution_arg,
)
from ..connector import load_prompt_cache
from ..errors import InputError
from ..fe2e import DEFAULT_SEED as FE2E_SEED
from ..metrics import CONN_COMPONENTS
from ..targets import DEPTH_SPACES
from ..tasks import TASKS
from .protocols import PROTOCOLS, get_protocol
from .report import write_report
from .runner import BENCHMARK_POINT_SIGMA_PX, EvaluationSettings, Model, evaluate_suite
from .suites import SUITES, get_suite

logger = logging.getLogger("e2p_core")


def evaluate(args: argparse.Namespace) -> None:
    # Each family's published settings, where the user gave none (FE2E: its protocol, seed, size buckets).
    fe2e = args.model == "fe2e"
    args.protocol = args.protocol or ("fe2e" if fe2e else "e2p")
    args.seed = args.seed if args.seed is not None else (FE2E_SEED if fe2e else 42)
    args.resolution = args.resolution if args.resolution is not None else ("buckets" if fe2e else 768)
    # Check every suite and path before loading the model, so a typo costs nothing.
    jobs = _suite_jobs(args)
    protocol = get_protocol(args.protocol, depth_space=args.depth_space, normal_aggregation=args.normal_aggregation,
                            conn_component=args.conn_component)
    protocol.check(args.task)
    device, dtype = device_and_dtype(args)
    if fe2e:
        model = _fe2e_model(args, device, dtype)
    else:
        model = _e2p_model(args, device, dtype)
    settings = EvaluationSettings(steps=args.steps, seed=args.seed, resize=args.resize, resolution=args.resolution,
                                  protocol=protocol, point_sigma_px=args.point_sigma, limit=args.limit)

    results = []
    for suite, data_root, list_file in jobs:
        logger.info("%s: %s", suite.title, data_root)
        result = evaluate_suite(model, suite, data_root, list_file, settings,
                                on_sample=lambda i, n, name: logger.info("[%d/%d] %s", i + 1, n, name))
        logger.info("%s: %s", suite.title, ", ".join(f"{k}={v:.4g}" for k, v in result.metrics.items()))
        results.append(result)
    method = args.name or " + ".join(Path(path).stem for path in [args.dit, *(lora_arg(spec)[0] for spec in args.lora)])
    paths = write_report(results, args.out_dir, method, settings)
    print((Path(args.out_dir) / "results.md").read_text())
    logger.info("wrote %s", ", ".join(map(str, paths)))


def _e2p_model(args: argparse.Namespace, device, dtype) -> Model:
    prompt = prompt_embeddings(args, device, dtype)
    expected_prompt = prompt_text(args.task, args.matting_prompt)
    if prompt.prompt is not None and prompt.prompt != expected_prompt:
        logger.warning("the prompt embeddings were made from %r, not the %s prompt %r", prompt.prompt, args.task,
                       expected_prompt)
    denoiser, codec, _ = load_model(args, device, dtype)
    return Model(args.task, denoiser, codec, prompt)


def _fe2e_model(args: argparse.Namespace, device, dtype) -> Model:
    """FE2E predicts depth and normals in one pass; the suites' task (``--task``) says which map is scored."""
    from ..cli_fe2e import fill_fe2e_paths, load_fe2e_model

    if args.task not in ("depth", "normal"):
        raise InputError(f"FE2E predicts depth and normals, not {args.task}")
    if not args.prompt_cache:
        raise InputError("FE2E needs --prompt-cache no_info.npz (the FE2E repository's latent/no_info.npz)")
    cache = load_prompt_cache(args.prompt_cache).to(device)
    fill_fe2e_paths(args)
    denoiser, codec = load_fe2e_model(args, device, dtype)
    return Model(args.task, denoiser, codec, cache, family="fe2e")


def _suite_jobs(args: argparse.Namespace) -> list[tuple]:
    """[(Suite, data root, list file or None)], checked: one root per suite, list files at matching positions."""
    if len(args.data_root) != len(args.suite):
        raise InputError(f"give one --data-root per --suite ({len(args.suite)} suite(s), "
                         f"{len(args.data_root)} data root(s))")
    list_files = args.list_file or [None] * len(args.suite)
    if len(list_files) != len(args.suite):
        raise InputError(f"give --list-file for every --suite or for none (use 'auto' to discover the files); "
                         f"got {len(list_files)} for {len(args.suite)} suite(s)")
    jobs = []
    for name, root, list_file in zip(args.suite, args.data_root, list_files):
        if not Path(root).exists():
            raise InputError(f"--data-root {root} (for --suite {name}) does not exist")
        jobs.append((get_suite(args.task, name), root, None if list_file in (None, "auto") else list_file))
    return jobs


def add_evaluate_parser(commands: argparse._SubParsersAction) -> None:
    """The ``evaluate`` subcommand: model options as ``predict``, benchmark options, and the official defaults."""
    suite_names = sorted({name for _, name in SUITES})
    v = commands.add_parser("evaluate", help="run the zero-shot benchmarks and write a paper-style table")
    v.add_argument("--model", choices=("e2p", "fe2e"), default="e2p",
                   help="e2p: Edit2Perceive (default); fe2e: FE2E, whose one pass predicts depth and normals (--task "
                        "picks the suites scored), with FE2E's protocol, seed 1234 and size buckets by default")
    v.add_argument("--prompt-cache", help="FE2E: the empty-prompt embedding no_info.npz (latent/no_info.npz)")
    v.add_argument("--task", choices=sorted(TASKS), default="depth", help="what the model predicts (default depth)")
    v.add_argument("--suite", action="append", required=True, choices=suite_names,
                   help="benchmark, repeatable: depth nyuv2/kitti/eth3d/scannet/diode; normal nyuv2/scannet/ibims/"
                        "diode; matting p3m500np/am2k/aim500 (Sintel is Edit2Perceive normal training data: not a "
                        "benchmark here)")
    v.add_argument("--data-root", action="append", required=True,
                   help="the suite's folder or tar archive (one per --suite, in order)")
    v.add_argument("--list-file", action="append",
                   help="filename list (e.g. Marigold's data_split file) per --suite, in order; 'auto' = discover")
    v.add_argument("--out-dir", default="eval_results", help="where results.md/.csv go (default %(default)s)")
    v.add_argument("--name", help="the method's name in the table (default: the DiT and LoRA file names)")
    v.add_argument("--limit", type=int, help="evaluate only the first N samples of each suite")
    add_model_arguments(v)
    v.add_argument("--steps", type=int, default=1, help="sampling steps (default 1, as the official benchmarks)")
    v.add_argument("--seed", type=int, help="noise seed (default 42; FE2E 1234)")
    v.add_argument("--resize", choices=("aligned", "reference"), default="reference",
                   help="reference: the official sizes (default: Edit2Perceive's square squash, FE2E's buckets); "
                        "aligned: keep the aspect ratio")
    v.add_argument("--resolution", type=resolution_arg,
                   help="processing size (default 768; FE2E its size buckets), 'native', or WxH (FE2E)")
    v.add_argument("--protocol", choices=sorted(PROTOCOLS),
                   help="e2p: the official Edit2Perceive evaluation (default); fe2e: FE2E's (log-depth alignment over "
                        "positive predictions, Marigold's depth ranges, renormalised normals pooled over all pixels, "
                        "DSINE's or Marigold's normal files); see e2p_core/evaluation/protocols.py")
    v.add_argument("--depth-space", choices=DEPTH_SPACES,
                   help="e2p protocol: space of the least-squares depth alignment: sqrt (default, the released "
                        "sqrt-trained model), log, uniform (linear depth, what the official script does for a "
                        "checkpoint file name without 'sqrt')")
    v.add_argument("--normal-aggregation", choices=("per_image", "pooled"),
                   help="e2p protocol: per_image (default): average per-image metrics; pooled: all pixels together")
    v.add_argument("--conn-component", choices=CONN_COMPONENTS,
                   help="e2p protocol, matting Conn: most_frequent_label (default, the official Edit2Perceive "
                        "evaluation: background label included) or largest_foreground (the dataset owners' "
                        "DIM/P3M code)")
    v.add_argument("--point-sigma", type=float, default=BENCHMARK_POINT_SIGMA_PX,
                   help="matting: σ of the simulated click Gaussians in ground-truth pixels (default %(default)s)")
    v.set_defaults(run=evaluate)
