"""``python -m e2p_core``: predict, convert weights, precompute prompt embeddings, and evaluate on benchmarks.

    python -m e2p_core predict --task depth --image photo.jpg --out depth.png   # weights from disk or the hub
    python -m e2p_core predict --task depth --dit kontext.safetensors --lora depth_lora.safetensors --vae ae.safetensors
        --prompt-embeds depth.safetensors --image photo.jpg --out depth.png
    python -m e2p_core predict --task depth,normal,matting --points clicks.json --image photo.jpg --out maps/{task}.png
    python -m e2p_core download --task depth [--weights lora|full] [--comfyui COMFYUI_DIR | --to DIR]
    python -m e2p_core convert --kind dit --input depth.safetensors --to bfl --output depth_bfl.safetensors
    python -m e2p_core embed-prompts --text-encoders FLUX.1-Kontext-dev --out-dir embeddings/
    python -m e2p_core embed-prompts --comfyui ComfyUI --out-dir ComfyUI/models/e2p_prompts   # encoders fetched if missing
    python -m e2p_core evaluate --task depth --suite nyuv2 --data-root nyu_labeled_extracted.tar --dit ... --vae ...
        --prompt-embeds depth.safetensors --out-dir eval/   # see e2p_core/evaluation

Everything is checked before anything is written, and outputs are written atomically (temp file + rename).
"""

import argparse
import logging
import sys
from pathlib import Path

from .checkpoints import (
    convert_dit,
    load_lora_file,
    load_state_dict,
    lora_to_diffsynth_peft,
    lora_to_diffusers_peft,
    lora_to_kohya,
    save_safetensors_atomic,
    vae_diffusers_to_bfl,
    vae_to_diffusers,
)
from .cli_inputs import point_prompt
from .cli_models import (
    DTYPES,
    add_model_arguments,
    device_and_dtype,
    load_model,
    lora_arg,
    prompt_embeddings,
    prompt_text,
    resolution_arg,
)
from .cli_outputs import check_output_path, output_view, publish, write_map
from .cli_tasks import predict_tasks, task_list, task_runs
from .errors import E2PError, InputError
from .evaluation.command import add_evaluate_parser
from .hub import Store
from .hub.command import add_download_parser
from .images import load_image_rgb
from .prompts import encode_prompts, save_prompt_embeddings
from .tasks import TASKS
from .text_encoders import automatic_encoder_source
from .video import TemporalOptions
from .weights import TIME_EMBEDDING_METADATA_KEY

logger = logging.getLogger("e2p_core")


# ------------------------------------------------------------------------------------------------------- predict


def predict(args: argparse.Namespace) -> None:
    if args.model == "fe2e":
        from .cli_fe2e import predict_fe2e

        if args.per_task:
            raise InputError("TASK=VALUE options belong to Edit2Perceive's --task (--model e2p)")
        return predict_fe2e(args)
    if not args.task:
        raise InputError("--task is required for Edit2Perceive (--model e2p)")
    for flag, value in (("--prompt-cache", args.prompt_cache), ("--out-normal", args.out_normal),
                        ("--encode-noise", args.encode_noise)):
        if value:
            raise InputError(f"{flag} belongs to FE2E (--model fe2e)")
    if isinstance(args.resolution, tuple):
        raise InputError("--resolution WxH is FE2E's; Edit2Perceive takes N or native (with --resize)")
    args.seed = 42 if args.seed is None else args.seed
    args.resize = args.resize or "aligned"
    args.resolution = 768 if args.resolution is None else args.resolution
    runs = task_runs(args)
    from .cli_sequence import is_sequence

    if is_sequence(args.image) or args.tiles not in (None, "0"):
        if len(runs) > 1:
            raise InputError(f"--task {','.join(args.task)}: several tasks run on one image without --tiles; run a "
                             f"folder, a video or --tiles once per task")
        return _predict_frames(runs[0])
    predict_tasks(runs)  # one image: e2p_core.cli_tasks (one encode of the image for every task)


def _predict_frames(args: argparse.Namespace) -> None:
    """A folder of frames or a video (--out is a folder), and/or --tiles: e2p_core.cli_sequence streams them."""
    from .cli_sequence import is_sequence, predict_frames, read_frames, tile_count, write_sequence
    from .pipeline import perceive

    sequence = is_sequence(args.image)
    unsupported = [flag for flag, value in (("--raw", args.raw), ("--noise", args.noise)) if value]
    if unsupported:
        raise InputError(f"{', '.join(unsupported)} take one image without --tiles")
    if sequence and Path(args.out).suffix.lower() in (".png", ".npy"):
        raise InputError(f"--out {args.out}: frames of a folder or video go into a folder; give a folder name")
    points, point_map = None, None
    if sequence:
        prompted = [flag for flag in ("points", "point_mask", "point_map") if getattr(args, flag)]
        if prompted:  # a click on one frame does not follow the object through the clip
            raise InputError(f"--{prompted[0].replace('_', '-')} takes one image; a folder or video has no prompt")
    else:
        check_output_path(args.out, (".png", ".npy"), "--out")
        image = load_image_rgb(args.image)
        points, point_map = point_prompt(args, image.shape[:2])  # mapped into each tile by the tiling
    tile_count(args.tiles, (1, 1), args.resolution)  # a bad --tiles fails before the models load
    device, dtype = device_and_dtype(args)
    prompt = prompt_embeddings(args, device, dtype)
    denoiser, codec, _ = load_model(args, device, dtype)

    def run(images, points, point_map):
        return perceive(denoiser, codec, images, args.task, prompt, points=points, point_map=point_map,
                        steps=args.steps, seed=args.seed, resize=args.resize, resolution=args.resolution)

    frames = read_frames(args.image) if sequence else iter([(Path(args.image).stem, image)])
    outputs = predict_frames(run, frames, args.task, args.tiles, args.resolution, args.chunk_size,
                             points=points, point_map=point_map)
    if sequence:
        logger.info("wrote %d frames to %s", write_sequence(args, outputs), args.out)
        return
    ((_, _, output),) = outputs
    as_npy = args.out.lower().endswith(".npy")
    publish({args.out: lambda tmp: write_map(tmp, output_view(args, output, as_npy), as_npy)})


# ------------------------------------------------------------------------------------------------------- convert


def convert(args: argparse.Namespace) -> None:
    metadata = None
    if args.kind == "dit":
        from .weights import load_dit

        dit = load_dit(args.input, args.config, [lora_arg(spec) for spec in args.lora])
        tensors = convert_dit(dit.state_dict_bfl, args.to)
        if dit.time_embedding:
            metadata = {TIME_EMBEDDING_METADATA_KEY: dit.time_embedding}
    elif args.kind == "vae":
        tensors = vae_to_diffusers(load_state_dict(args.input))
        tensors = tensors if args.to == "diffusers" else vae_diffusers_to_bfl(tensors)
    else:
        lora = load_lora_file(args.input)
        writers = {"kohya": lambda: (lora_to_kohya(lora), None),
                   "diffsynth": lambda: (lora_to_diffsynth_peft(lora), None),
                   "diffusers": lambda: lora_to_diffusers_peft(lora)}
        if args.to not in writers:
            raise InputError(f"LoRAs convert to kohya, diffsynth or diffusers, not {args.to!r}")
        tensors, metadata = writers[args.to]()
    if args.dtype != "keep":
        tensors = {key: value.to(DTYPES[args.dtype]) if value.is_floating_point() else value
                   for key, value in tensors.items()}
    save_safetensors_atomic(tensors, args.output, metadata)
    logger.info("wrote %s (%d tensors, %s naming)", args.output, len(tensors), args.to)


# ------------------------------------------------------------------------------------------------- embed-prompts


def embed_prompts(args: argparse.Namespace) -> None:
    if args.prompt:
        if not args.out:
            raise InputError("--prompt needs --out FILE")
        jobs = [(args.prompt, Path(args.out))]
    else:
        jobs = [(prompt_text(task, args.matting_prompt), Path(args.out_dir) / f"{task}.safetensors")
                for task in args.task]
    # Without --text-encoders: the table's encoders (or a ComfyUI install's) from disk, else downloaded.
    store = Store.comfyui(args.comfyui) if args.comfyui else Store()
    encoders = args.text_encoders or automatic_encoder_source(store).locate()
    embeddings = encode_prompts([prompt for prompt, _ in jobs], encoders, args.device, DTYPES[args.dtype])
    for (_, path), embedding in zip(jobs, embeddings):
        save_prompt_embeddings(embedding, path)
        logger.info("wrote %s", path)


# -------------------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m e2p_core", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("predict", help="run Edit2Perceive (or FE2E) on one image")
    p.add_argument("--model", choices=("e2p", "fe2e"), default="e2p",
                   help="e2p: Edit2Perceive on FLUX.1 Kontext (default); fe2e: FE2E on Step1X-Edit, depth AND normals "
                        "from one pass (--out depth, --out-normal normals)")
    p.add_argument("--task", type=task_list,
                   help=f"what to predict (Edit2Perceive): {', '.join(sorted(TASKS))}, or a comma list "
                        "(depth,normal,matting): the image is VAE-encoded once for all of them, then each task's DiT "
                        "loads in turn (the base file is read once per task), and {task} in --out/--raw names each "
                        "task's file; --dit/--lora/--prompt-embeds TASK=VALUE give one task's weights")
    add_model_arguments(p, per_task=True)
    p.add_argument("--image", required=True, help="input image (RGB; grayscale and RGBA are converted), or a folder "
                                                  "of frames or a video file (then --out is a folder)")
    p.add_argument("--out", required=True, help="output map: .png (16-bit gray for depth/alpha, 8-bit RGB for "
                                                "normals) or .npy (float32)")
    p.add_argument("--raw", help="also write the stages velocity, latent, decoded, output (and point_map), at the "
                                 "processing size, to this safetensors file")
    p.add_argument("--steps", type=int, default=1, help="sampling steps (default 1, the paper's setting)")
    p.add_argument("--seed", type=int, help="noise seed (default as the reference: 42, FE2E 1234)")
    p.add_argument("--noise", help="safetensors with key 'noise' [1,16,h,w] to use instead of seeded noise (FE2E: "
                                   "the start latent)")
    p.add_argument("--prompt-cache", help="FE2E: the cached empty-prompt Qwen2.5-VL embedding no_info.npz (from the "
                                          "FE2E repository, latent/no_info.npz)")
    p.add_argument("--encode-noise", help="FE2E: safetensors with key 'eps' [1,16,h,w], the VAE posterior sample's "
                                          "noise (default: drawn from --seed)")
    p.add_argument("--out-normal", help="FE2E: also write the normal map (.png 8-bit RGB or .npy)")
    p.add_argument("--points", help="matting clicks: KJNodes JSON [{\"x\":..,\"y\":..}] (string or file)")
    p.add_argument("--negative-points", help="negative clicks (ignored: the model was trained on positives only)")
    p.add_argument("--points-space", choices=("auto", "pixels", "normalized"), default="auto",
                   help="coordinates of --points; auto = normalized when all lie in [0,1]")
    p.add_argument("--point-mode", choices=("app", "clicks"), default="app",
                   help="app: 10 seed-42 points sampled in disks around the clicks (the official app); "
                        "clicks: Gaussians exactly at the clicks")
    p.add_argument("--point-sigma", type=float, help="Gaussian sigma in processing pixels (default 30 at 768)")
    p.add_argument("--point-radius", type=float, help="click disk radius in processing pixels (default 100 at 768)")
    p.add_argument("--point-mask", help="matting foreground mask at the image size (PNG, or safetensors "
                                        "'point_mask'): 10 points are sampled where it exceeds 0.8, as in training")
    p.add_argument("--point-map", help="soft point map in [0,1] at the image size: PNG or safetensors 'point_map'")
    p.add_argument("--resize", choices=("aligned", "reference"),
                   help="aligned: keep aspect, pad to /16, exact H x W back (Edit2Perceive's default); reference: the "
                        "official sizes (Edit2Perceive: square squash; FE2E: its size buckets, FE2E's default)")
    p.add_argument("--resolution", type=resolution_arg,
                   help="processing size: longer side (aligned) or square side (reference), 'native', or WxH exactly "
                        "(FE2E); default 768 (Edit2Perceive), FE2E's buckets")
    p.add_argument("--tiles", help="high-resolution tiling: N tiles along the longer side (a global pass + the "
                                   "tiles: 1 + rows x cols DiT calls per frame), 'auto' (tiles of about the "
                                   "processing size), or 0 (off, default)")
    p.add_argument("--temporal", choices=("aligned", "independent"), default="aligned",
                   help="depth of a folder or video: aligned co-aligns every frame's scale and shift to its "
                        "neighbours, matched by optical flow (no flicker), and normalises the clip once (default); "
                        "independent = per frame")
    p.add_argument("--temporal-window", type=int, default=TemporalOptions.window,
                   help="frames each frame is aligned to (default %(default)s)")
    p.add_argument("--temporal-horizon", type=int, default=TemporalOptions.horizon,
                   help="frames on each side whose (Gaussian-weighted) mean normalisation anchors the alignment "
                        "(default %(default)s; 0 = the chain alone)")
    p.add_argument("--chunk-size", type=int, default=4, help="frames per model call for folders and videos")
    p.add_argument("--sequence-format", choices=("png", "npy"), default="png",
                   help="file type of each frame of a folder or video output")
    p.add_argument("--depth-polarity", choices=("near_white", "near_black"), default="near_white",
                   help="depth --out polarity: near_white for ControlNet (default), near_black as predicted")
    p.add_argument("--normal-convention", choices=("controlnet_bae", "opengl", "directx"), default="controlnet_bae",
                   help="normal --out axes: controlnet_bae (+x left, +y up, +z to camera; default), opengl "
                        "(+x right), directx (+x right, +y down)")
    p.set_defaults(run=predict)

    c = commands.add_parser("convert", help="convert weights between DiffSynth, BFL and diffusers namings")
    c.add_argument("--kind", choices=("dit", "vae", "lora"), default="dit")
    c.add_argument("--input", required=True, help="input weights (file or diffusers folder)")
    c.add_argument("--output", required=True, help="output .safetensors")
    c.add_argument("--to", required=True, choices=("bfl", "diffsynth", "diffusers", "kohya"),
                   help="target naming; bfl is what ComfyUI's UNETLoader loads, kohya is for LoRAs")
    c.add_argument("--config", help="diffusers-style config.json for non-standard DiT sizes")
    c.add_argument("--lora", action="append", default=[], help="merge this LoRA into the DiT first (PATH[:STRENGTH])")
    c.add_argument("--dtype", choices=("keep", *sorted(DTYPES)), default="keep", help="cast floating tensors")
    c.set_defaults(run=convert)

    e = commands.add_parser("embed-prompts", help="precompute the task prompt embeddings (T5 + CLIP pooled)")
    where = e.add_mutually_exclusive_group()
    where.add_argument("--text-encoders", help="a diffusers FLUX folder, a ComfyUI models/text_encoders folder "
                                               "(clip_l + t5xxl_fp16) or a ComfyUI folder (default: from the Hugging "
                                               "Face cache, downloaded when missing)")
    where.add_argument("--comfyui", metavar="COMFYUI_DIR", help="take the text encoders from (or download them "
                                                                "into) COMFYUI_DIR/models/text_encoders")
    e.add_argument("--out-dir", default=".", help="where <task>.safetensors go")
    e.add_argument("--task", nargs="+", choices=sorted(TASKS), default=sorted(TASKS))
    e.add_argument("--prompt", help="encode this text instead of the task prompts (needs --out)")
    e.add_argument("--out", help="output file for --prompt")
    e.add_argument("--matting-prompt", choices=("training", "inference_py"), default="training")
    e.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    e.add_argument("--device", default="cpu")
    e.set_defaults(run=embed_prompts)

    add_evaluate_parser(commands)
    add_download_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        args.run(args)
    except E2PError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
