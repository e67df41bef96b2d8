"""``python -m e2p_core``: predict, convert weights, precompute prompt embeddings, and evaluate on benchmarks.

    python -m e2p_core predict --task depth --dit kontext.safetensors --lora depth_lora.safetensors --vae ae.safetensors
        --prompt-embeds depth.safetensors --image photo.jpg --out depth.png
    python -m e2p_core convert --kind dit --input depth.safetensors --to bfl --output depth_bfl.safetensors
    python -m e2p_core embed-prompts --text-encoders FLUX.1-Kontext-dev --out-dir embeddings/
    python -m e2p_core evaluate --task depth --suite nyuv2 --data-root nyu_labeled_extracted.tar --dit ... --vae ...
        --prompt-embeds depth.safetensors --out-dir eval/   # see e2p_core/evaluation

Everything is checked before anything is written, and outputs are written atomically (temp file + rename).
"""

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from .backends.memory import MEMORY_MODES
from .checkpoints import (
    convert_dit,
    load_lora_file,
    load_state_dict,
    lora_to_diffsynth_peft,
    lora_to_diffusers_peft,
    lora_to_kohya,
    save_safetensors_atomic,
    stage_file,
    vae_diffusers_to_bfl,
    vae_to_diffusers,
)
from .conventions import depth_hint, normals_to_convention, normals_to_rgb01
from .errors import E2PError, InputError
from .images import load_image_rgb
from .pipeline import Perception, PointPrompt
from .points import parse_points, to_pixel_coords, warn_negative_points
from .prompts import cached_prompt_embeddings, encode_prompts, load_prompt_embeddings, save_prompt_embeddings
from .tasks import MATTING_PROMPT_INFERENCE_PY, TASKS
from .time_embedding import TIME_EMBEDDINGS
from .weights import TIME_EMBEDDING_METADATA_KEY

logger = logging.getLogger("e2p_core")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_CACHE_DIR = Path(os.environ.get("E2P_CACHE_DIR", Path.home() / ".cache" / "edit2perceive"))


# ------------------------------------------------------------------------------------------------------- predict


def predict(args: argparse.Namespace) -> None:
    from .backends.diffusers_backend import load_diffusers_backend  # diffusers is only imported when predicting
    from .pipeline import perceive
    from .weights import load_dit, load_vae

    # Read and check every input before loading models, so a typo costs nothing and nothing is written.
    _check_output_path(args.out, (".png", ".npy"), "--out")
    if args.raw:
        _check_output_path(args.raw, (".safetensors",), "--raw")
    image = load_image_rgb(args.image)
    points, point_map = _point_prompt(args, image.shape[:2])
    noise = _read_tensor_file(args.noise, "noise") if args.noise else None
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but no CUDA GPU is available")
    dtype = DTYPES[args.dtype]
    prompt = _prompt_embeddings(args, device, dtype)

    loras = [_lora_arg(spec) for spec in args.lora]
    if Path(args.dit).suffix.lower() == ".gguf":  # city96 / ComfyUI-GGUF: quantised weights, see backends.gguf
        from .backends.gguf import load_gguf_dit

        dit = load_gguf_dit(args.dit, args.dit_config, loras)
    else:
        dit = load_dit(args.dit, args.dit_config, loras)
    vae = load_vae(args.vae, args.vae_config)
    denoiser, codec = load_diffusers_backend(dit, vae, dtype, device, args.time_embedding, args.memory_mode)
    logger.info("DiT %s (%s naming), %s on %s", Path(args.dit).name, dit.source_format, args.dtype, device)
    del dit, vae  # on a GPU the host copies are no longer needed: free them (up to the model's size) before running

    result = perceive(
        denoiser, codec, image, args.task, prompt,
        points=points, point_map=point_map, steps=args.steps, seed=args.seed, noise=noise,
        resize=args.resize, resolution=args.resolution,
        on_step=lambda i, n: logger.info("step %d/%d", i + 1, n),
    )
    _write_outputs(args, result)


def _check_output_path(path: str, suffixes: tuple[str, ...], flag: str) -> None:
    if Path(path).suffix.lower() not in suffixes:
        raise InputError(f"{flag} {path}: expected a {' or '.join(suffixes)} file")
    if Path(path).is_dir():
        raise InputError(f"{flag} {path} is a folder; give a file name")


def _prompt_embeddings(args, device, dtype):
    if args.prompt_embeds:
        return load_prompt_embeddings(args.prompt_embeds).to(device, dtype)
    if not args.text_encoders:
        raise InputError("give --prompt-embeds FILE (see `embed-prompts`) or --text-encoders FOLDER")
    return cached_prompt_embeddings(_prompt_text(args.task, args.matting_prompt), args.text_encoders, args.cache_dir,
                                    device, dtype)


def _prompt_text(task: str, matting_prompt: str) -> str:
    return MATTING_PROMPT_INFERENCE_PY if task == "matting" and matting_prompt == "inference_py" else TASKS[task].prompt


def _lora_arg(spec: str) -> tuple[str, float]:
    """``PATH`` or ``PATH:STRENGTH``."""
    path, sep, strength = spec.rpartition(":")
    if sep and path and not Path(spec).exists():
        try:
            return path, float(strength)
        except ValueError:
            pass
    return spec, 1.0


def _point_prompt(args, image_hw):
    """(PointPrompt | None, point map [H,W] | None) from --points / --point-mask / --point-map."""
    given = [flag for flag in ("points", "point_mask", "point_map") if getattr(args, flag)]
    if len(given) > 1:
        raise InputError(f"give only one of --points, --point-mask and --point-map (got {len(given)})")
    if args.points:
        text = Path(args.points).read_text() if Path(args.points).is_file() else args.points
        warn_negative_points(args.negative_points or "")
        points_px = to_pixel_coords(parse_points(text), image_hw[1], image_hw[0], args.points_space)
        return PointPrompt(points_px, None, args.point_mode, args.point_sigma, args.point_radius), None
    if args.point_mask:
        mask = _read_map(args.point_mask, image_hw, "point_mask")
        return PointPrompt(None, mask, "mask", args.point_sigma), None
    if args.point_map:
        return None, _read_map(args.point_map, image_hw, "point_map")
    return None, None


def _read_map(path: str, image_hw, key: str) -> np.ndarray:
    """A map in [0,1] at the image size: a PNG (8 or 16 bit, first channel) or safetensors with ``key`` [H,W]."""
    if path.endswith(".safetensors"):
        values = _read_tensor_file(path, key).float().numpy()
        while values.ndim > 2 and values.shape[0] == 1:  # tolerate [1,H,W] and [1,1,H,W]
            values = values[0]
    else:
        from PIL import Image

        try:
            with Image.open(path) as img:
                raw = np.asarray(img)
        except OSError as exc:
            raise InputError(f"cannot read {path}: {exc}") from None
        if raw.ndim == 3:
            raw = raw[..., 0]
        values = raw.astype(np.float32) / (65535.0 if raw.dtype == np.uint16 else 255.0)
    if values.shape != tuple(image_hw):
        raise InputError(f"{path} is {values.shape[1]}x{values.shape[0]}, the image is {image_hw[1]}x{image_hw[0]} "
                         f"(width x height); they must match")
    return values


def _read_tensor_file(path: str, key: str) -> torch.Tensor:
    tensors = load_state_dict(path)
    if key not in tensors:
        raise InputError(f"{path} has no tensor {key!r}; it has {sorted(tensors)[:8]}")
    return tensors[key]


def _write_outputs(args, result: Perception) -> None:
    """Stage --out (and --raw) as temp files and publish them only once all are complete."""
    writers = {args.out: lambda tmp: _save_view(tmp, args, result)}
    if args.raw:
        # The algorithm's stages, all on the processing grid like the reference's own tensors.
        raw = {"velocity": result.velocity, "latent": result.latent, "decoded": result.decoded,
               "output": result.postprocessed}
        if result.point_map is not None:
            raw["point_map"] = result.point_map
        raw = {key: value.detach().cpu().contiguous() for key, value in raw.items()}
        writers[args.raw] = lambda tmp: save_file(raw, tmp, metadata=_raw_metadata(args))
    staged = {}
    try:
        for final, write in writers.items():
            staged[final] = stage_file(final, write)
    except BaseException:
        for temp in staged.values():
            temp.unlink(missing_ok=True)
        raise
    for final, temp in staged.items():
        os.replace(temp, final)
    logger.info("wrote %s", ", ".join(staged))


def _raw_metadata(args) -> dict[str, str]:
    keys = ("task", "steps", "seed", "resize", "resolution", "dtype", "time_embedding")
    return {"e2p.args": json.dumps({key: getattr(args, key) for key in keys})}


def _save_view(path: str, args, result: Perception) -> None:
    """The user-facing map: depth with the chosen polarity, normals in the chosen convention, or alpha.

    ``path`` is the staged temp file; the format comes from the final name ``args.out``.
    """
    as_npy = args.out.lower().endswith(".npy")
    output = result.output[0]  # [C,H,W]
    if args.task == "depth":
        view = depth_hint(output, args.depth_polarity)[0].numpy()  # [H,W]
    elif args.task == "normal":
        normals = normals_to_convention(output[None], args.normal_convention)[0]
        view = (normals if as_npy else normals_to_rgb01(normals)).permute(1, 2, 0).numpy()
    else:
        view = output[0].numpy()
    if as_npy:
        with open(path, "wb") as handle:  # a file object: np.save would append ".npy" to the temp name
            np.save(handle, view.astype(np.float32))
        return
    from PIL import Image

    if view.ndim == 3:  # normal maps: 8-bit RGB, what every normal-map consumer reads
        Image.fromarray(np.round(np.clip(view, 0, 1) * 255).astype(np.uint8)).save(path, format="PNG")
    else:  # depth and alpha: 16-bit grayscale keeps the fine gradations 8 bits would band
        Image.fromarray(np.round(np.clip(view, 0, 1) * 65535).astype(np.uint16)).save(path, format="PNG")


# ------------------------------------------------------------------------------------------------------- convert


def convert(args: argparse.Namespace) -> None:
    metadata = None
    if args.kind == "dit":
        from .weights import load_dit

        dit = load_dit(args.input, args.config, [_lora_arg(spec) for spec in args.lora])
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
        jobs = [(_prompt_text(task, args.matting_prompt), Path(args.out_dir) / f"{task}.safetensors")
                for task in args.task]
    embeddings = encode_prompts([prompt for prompt, _ in jobs], args.text_encoders, args.device, DTYPES[args.dtype])
    for (_, path), embedding in zip(jobs, embeddings):
        save_prompt_embeddings(embedding, path)
        logger.info("wrote %s", path)


# -------------------------------------------------------------------------------------------------------- parser


def _resolution(value: str):
    if value == "native":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'native', got {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m e2p_core", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("predict", help="run Edit2Perceive on one image")
    p.add_argument("--task", required=True, choices=sorted(TASKS), help="what to predict")
    p.add_argument("--dit", required=True, help="base or E2P DiT: BFL/ComfyUI file (fp8 ok), DiffSynth file, "
                                                "or diffusers folder")
    p.add_argument("--dit-config", help="diffusers-style config.json for non-standard DiT sizes (RoPE axes)")
    p.add_argument("--lora", action="append", default=[], help="task LoRA (kohya/PEFT), PATH or PATH:STRENGTH; "
                                                              "repeatable")
    p.add_argument("--vae", required=True, help="Flux VAE: BFL ae.safetensors or diffusers folder")
    p.add_argument("--vae-config", help="diffusers-style config.json for a non-standard VAE")
    p.add_argument("--prompt-embeds", help="safetensors with prompt_embeds [1,L,D] and pooled_prompt_embeds [1,P]")
    p.add_argument("--text-encoders", help="FLUX folder with text_encoder(_2)/tokenizer(_2), instead of "
                                           "--prompt-embeds; results are cached")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR), help="prompt-embedding cache (default: %(default)s)")
    p.add_argument("--matting-prompt", choices=("training", "inference_py"), default="training",
                   help="matting prompt: the training caption (default) or the reference inference.py one")
    p.add_argument("--image", required=True, help="input image (RGB; grayscale and RGBA are converted)")
    p.add_argument("--out", required=True, help="output map: .png (16-bit gray for depth/alpha, 8-bit RGB for "
                                                "normals) or .npy (float32)")
    p.add_argument("--raw", help="also write the stages velocity, latent, decoded, output (and point_map), at the "
                                 "processing size, to this safetensors file")
    p.add_argument("--steps", type=int, default=1, help="sampling steps (default 1, the paper's setting)")
    p.add_argument("--seed", type=int, default=42, help="noise seed (default 42, as the reference)")
    p.add_argument("--noise", help="safetensors with key 'noise' [1,16,h,w] to use instead of seeded noise")
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
    p.add_argument("--resize", choices=("aligned", "reference"), default="aligned",
                   help="aligned: keep aspect, pad to /16, exact H x W back (default); reference: square squash")
    p.add_argument("--resolution", type=_resolution, default=768,
                   help="processing size: longer side (aligned) or square side (reference), or 'native'")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="compute dtype (default bf16)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--memory-mode", choices=MEMORY_MODES, default="full",
                   help="how the DiT weights are held: full (compute dtype, default), fp8 (fp8 storage, ~14 GiB), "
                        "offload (block by block from host memory, 8-12 GB cards), fp8-offload, gguf (kept "
                        "quantised: a .gguf --dit as is, other files Q8_0)")
    p.add_argument("--time-embedding", choices=TIME_EMBEDDINGS,
                   help="timestep-frequency variant (default: as the DiT file records, else 'reference')")
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
    e.add_argument("--text-encoders", required=True, help="FLUX folder with text_encoder(_2) and tokenizer(_2)")
    e.add_argument("--out-dir", default=".", help="where <task>.safetensors go")
    e.add_argument("--task", nargs="+", choices=sorted(TASKS), default=sorted(TASKS))
    e.add_argument("--prompt", help="encode this text instead of the task prompts (needs --out)")
    e.add_argument("--out", help="output file for --prompt")
    e.add_argument("--matting-prompt", choices=("training", "inference_py"), default="training")
    e.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    e.add_argument("--device", default="cpu")
    e.set_defaults(run=embed_prompts)

    from .evaluation.command import add_evaluate_parser  # it imports helpers of this module, so it comes last

    add_evaluate_parser(commands)
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
