"""``python -m e2p_core predict --model fe2e``: FE2E depth AND normals from one DiT pass.

    python -m e2p_core predict --model fe2e --dit step1x-edit-i1258.safetensors --lora LDRN.safetensors
        --vae vae.safetensors --prompt-cache no_info.npz --image photo.jpg --out depth.png --out-normal normal.png

``--raw`` writes the stages: ``prediction`` (the first DiT output of both halves, tokens [1,2N,64]),
``depth_latent`` / ``normal_latent`` [1,16,h,w], ``depth_decoded`` / ``normal_decoded`` (raw VAE output [1,3,H,W]
at the processing size), ``depth`` [1,1,H,W] in [0,1] and ``normal`` [1,3,H,W] unit vectors at the input size.
Everything is read and checked before the model runs; nothing is written on an error.
"""

import argparse
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from .cli_inputs import read_tensor_file
from .cli_models import device_and_dtype, lora_arg
from .cli_outputs import publish, write_map
from .connector import load_prompt_cache
from .conventions import depth_hint, normals_to_convention, normals_to_rgb01
from .errors import InputError
from .fe2e import DEFAULT_SEED, Fe2ePerception, perceive_fe2e
from .images import load_image_rgb

logger = logging.getLogger("e2p_core")

OUTPUT_SUFFIXES = (".png", ".npy")


def predict_fe2e(args: argparse.Namespace) -> None:
    # Read and check every input before loading the model, so a typo costs nothing and nothing is written.
    _check_arguments(args)
    image = load_image_rgb(args.image)
    cache = load_prompt_cache(args.prompt_cache)
    noise = read_tensor_file(args.noise, "noise").float() if args.noise else None
    encode_noise = read_tensor_file(args.encode_noise, "eps").float() if args.encode_noise else None
    device, dtype = device_and_dtype(args)

    fill_fe2e_paths(args)
    denoiser, codec = load_fe2e_model(args, device, dtype)
    result = perceive_fe2e(
        denoiser, codec, image, cache.to(device),
        steps=args.steps, seed=args.seed, noise=noise, encode_noise=encode_noise,
        resize=args.resize, resolution=args.resolution,
        on_step=lambda i, n: logger.info("step %d/%d", i + 1, n),
    )
    _write_outputs(args, result)


def load_fe2e_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """(Step1X denoiser, float32 VAE codec) of the diffusers backend; diffusers is imported only here."""
    from .backends.step1x_backend import load_step1x_backend
    from .weights import load_step1x, load_vae

    weights = load_step1x(args.dit, args.dit_config, [lora_arg(spec) for spec in args.lora], dtype)
    vae = load_vae(args.vae, args.vae_config)
    logger.info("Step1X-Edit %s, %s on %s", Path(args.dit).name, args.dtype, device)
    return load_step1x_backend(weights, vae, dtype, device)


def fill_fe2e_paths(args: argparse.Namespace) -> None:
    """``--dit`` / ``--vae`` / ``--lora`` not given: Step1X-Edit's checkpoint and VAE and FE2E's LoRA from the
    sources table (on disk, else downloaded). A ``--dit`` given adds no LoRA (pass ``--lora``), as for Edit2Perceive."""
    from .hub.command import store_from_args
    from .hub.fetch import resolve_all

    wanted = {}
    if not args.dit:
        wanted["dit"] = "fe2e_dit"
        if not args.lora:
            wanted["lora"] = "fe2e_lora"
    if not args.vae:
        wanted["vae"] = "fe2e_vae"
    if not wanted:
        return
    paths = resolve_all(wanted.values(), store_from_args(args))
    args.dit = str(paths["fe2e_dit"]) if "dit" in wanted else args.dit
    args.vae = str(paths["fe2e_vae"]) if "vae" in wanted else args.vae
    if "lora" in wanted:
        args.lora = [str(paths["fe2e_lora"])]


def _check_arguments(args: argparse.Namespace) -> None:
    if not args.prompt_cache:
        raise InputError("FE2E needs --prompt-cache no_info.npz (the FE2E repository's latent/no_info.npz)")
    if args.task or args.prompt_embeds or args.text_encoders:
        raise InputError("FE2E predicts depth and normals together from its own prompt cache: drop --task, "
                         "--prompt-embeds and --text-encoders")
    if args.memory_mode != "full":
        raise InputError(f"FE2E runs in memory mode 'full' only (got {args.memory_mode!r})")
    for flag in ("points", "point_mask", "point_map"):
        if getattr(args, flag):
            raise InputError(f"--{flag.replace('_', '-')} is for Edit2Perceive matting, not FE2E")
    for flag, path, suffixes in (("--out", args.out, OUTPUT_SUFFIXES), ("--out-normal", args.out_normal,
                                 OUTPUT_SUFFIXES), ("--raw", args.raw, (".safetensors",))):
        if path is None:
            continue
        if Path(path).suffix.lower() not in suffixes:
            raise InputError(f"{flag} {path}: expected a {' or '.join(suffixes)} file")
        if Path(path).is_dir():
            raise InputError(f"{flag} {path} is a folder; give a file name")
    args.seed = DEFAULT_SEED if args.seed is None else args.seed
    args.resize = args.resize or "reference"
    args.resolution = "buckets" if args.resolution is None else args.resolution


def _write_outputs(args: argparse.Namespace, result: Fe2ePerception) -> None:
    depth = depth_hint(result.depth[0], args.depth_polarity)[0]  # [H,W]
    writers = {args.out: lambda tmp: write_map(tmp, depth.numpy(), args.out.lower().endswith(".npy"))}
    if args.out_normal:
        as_npy = args.out_normal.lower().endswith(".npy")
        normals = normals_to_convention(result.normal, args.normal_convention)[0]  # [3,H,W]
        view = (normals if as_npy else normals_to_rgb01(normals)).permute(1, 2, 0).numpy()
        writers[args.out_normal] = lambda tmp: write_map(tmp, view, as_npy)
    if args.raw:
        raw = {"prediction": result.prediction, "depth_latent": result.depth_latent,
               "normal_latent": result.normal_latent, "depth_decoded": result.depth_decoded,
               "normal_decoded": result.normal_decoded, "depth": result.depth, "normal": result.normal}
        raw = {key: value.detach().cpu().contiguous() for key, value in raw.items()}
        settings = {key: getattr(args, key) for key in ("model", "steps", "seed", "resize", "resolution", "dtype")}
        writers[args.raw] = lambda tmp: save_file(raw, tmp, metadata={"e2p.args": json.dumps(settings)})
    publish(writers)
