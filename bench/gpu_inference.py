"""GPU latency and peak memory of Edit2Perceive at FLUX.1 Kontext size, every memory mode side by side with the
baseline a user would otherwise run: diffusers' ``FluxKontextPipeline``, one step, same resolution.

No download: the DiT (19 double + 38 single blocks, 11.9 B parameters) and the Flux VAE are built from their shapes
with random weights (generated on the device, then kept in host memory as a file would be); prompt embeddings are
random [1,512,4096] + [1,768] tensors, so no text encoder is needed on either side. Random weights give
meaningless pictures but the same work per step as the released ones.

Per (memory mode, task, resolution, steps): median end-to-end latency of ``perceive`` (image in, map out, on the
device), peak device memory while it runs, the DiT's resident weights, and the largest difference of the output
map from the eager ``full`` bf16 path (filled when ``full`` runs first in the same invocation). Targets (H100,
bf16): depth 768^2 1 step <= 0.20 s, 1024^2 <= 0.33 s, matting 768^2 <= 0.26 s; fp8 on a 24 GB card <= 0.30 s
(``--gpu-memory-limit-gib 24``); a 12 GB card works (``--gpu-memory-limit-gib 12 --modes offload fp8-offload``).

    python bench/gpu_inference.py --modes full                      # baseline + full bf16 (see bench/RESULTS.md
    python bench/gpu_inference.py --no-baseline --modes full fp8 gguf    # for the commands that fit 10 minutes)
    python bench/gpu_inference.py --compile max-autotune --channels-last-vae --modes full fp8
    python bench/gpu_inference.py --tiny --device cpu               # smoke test with the tiny fixture model
"""

import argparse
import gc
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from timing import latency, stage_times  # noqa: E402

from e2p_core.backends.diffusers_backend import load_diffusers_backend, speed_up  # noqa: E402
from e2p_core.backends.memory import MEMORY_MODES  # noqa: E402
from e2p_core.checkpoints import (  # noqa: E402
    bfl_to_diffusers,
    diffusers_to_bfl,
    infer_dit_architecture,
    infer_vae_architecture,
)
from e2p_core.pipeline import perceive  # noqa: E402
from e2p_core.prompts import PromptEmbeddings  # noqa: E402
from e2p_core.weights import DiTWeights, VAEWeights, load_dit, load_vae  # noqa: E402

FIXTURES = REPO / "tests" / "fixtures" / "e2p_tiny"
FLUX_VAE_CONFIG = dict(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                       block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                       norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                       use_post_quant_conv=False)
TARGETS_S = {("depth", 768, 1): 0.20, ("depth", 1024, 1): 0.33, ("matting", 768, 1): 0.26}  # H100, bf16
FP8_24GB_TARGET_S = 0.30
GIB = 2**30


# --------------------------------------------------------------------------------------------------------- models


def random_flux_kontext(device: torch.device) -> tuple[DiTWeights, VAEWeights]:
    """FLUX.1 Kontext-sized DiT (BFL naming, bf16, host memory) and Flux VAE with random weights."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    with torch.device("meta"):
        shapes_bfl = diffusers_to_bfl(FluxTransformer2DModel(guidance_embeds=True).state_dict())
    generator = torch.Generator(device).manual_seed(0)
    state_dict_bfl = {}
    for key, meta in shapes_bfl.items():
        if key.endswith(".scale"):  # RMSNorm weights
            value = torch.ones(meta.shape)
        elif meta.ndim == 2:  # Linear weights, fan-in scaled so activations stay O(1)
            value = torch.randn(meta.shape, generator=generator, device=device) * meta.shape[1] ** -0.5
        else:
            value = torch.zeros(meta.shape)
        state_dict_bfl[key] = value.to(torch.bfloat16).cpu()
    torch.manual_seed(0)
    vae_state_dict = AutoencoderKL(**FLUX_VAE_CONFIG).state_dict()  # diffusers' own random init
    architecture = infer_dit_architecture(state_dict_bfl)
    return (DiTWeights(state_dict_bfl, architecture, "bfl", None),
            VAEWeights(vae_state_dict, infer_vae_architecture(vae_state_dict)))


def tiny_fixture() -> tuple[DiTWeights, VAEWeights]:
    """The parity fixtures' tiny DiT and VAE (tests/fixtures/e2p_tiny)."""
    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    config = {"axes_dims_rope": manifest["tiny_config"]["rope_axes_dim"]}  # the one thing shapes cannot tell
    return load_dit(FIXTURES / "dit_bfl.safetensors", config), load_vae(FIXTURES / "vae_bfl.safetensors")


def random_prompt(dit: DiTWeights, device, dtype) -> PromptEmbeddings:
    generator = torch.Generator().manual_seed(1)
    arch = dit.architecture
    return PromptEmbeddings(torch.randn(1, 512, arch.text_dim, generator=generator),
                            torch.randn(1, arch.pooled_dim, generator=generator)).to(device, dtype)


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------------- baseline


def kontext_pipeline(dit: DiTWeights, vae: VAEWeights, device, dtype):
    """diffusers' FluxKontextPipeline over the same weights, without text encoders."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**dit.architecture.to_diffusers_config())
        autoencoder = AutoencoderKL(**vae.architecture.to_diffusers_config())
    transformer.load_state_dict({k: v.to(device, dtype) for k, v in bfl_to_diffusers(dit.state_dict_bfl).items()},
                                assign=True)
    autoencoder.load_state_dict({k: v.to(device, dtype) for k, v in vae.state_dict_diffusers.items()}, assign=True)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxKontextPipeline(scheduler=scheduler, vae=autoencoder.eval(), text_encoder=None, tokenizer=None,
                               text_encoder_2=None, tokenizer_2=None, transformer=transformer.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_baseline(pipe, image: np.ndarray, prompt: PromptEmbeddings, resolution: int, steps: int):
    from PIL import Image

    return pipe(image=Image.fromarray(image), prompt_embeds=prompt.prompt_embeds,
                pooled_prompt_embeds=prompt.pooled_prompt_embeds, height=resolution, width=resolution,
                num_inference_steps=steps, guidance_scale=1.0, output_type="pt", _auto_resize=False,
                max_area=resolution**2,  # else the pipeline rescales the output to 1024^2
                generator=torch.Generator("cpu").manual_seed(42)).images


# ---------------------------------------------------------------------------------------------------------- table


def peak_gib(device: torch.device) -> str:
    return f"{torch.cuda.max_memory_allocated(device) / GIB:.1f}" if device.type == "cuda" else "-"


def resident_gib(device: torch.device) -> str:
    return f"{torch.cuda.memory_allocated(device) / GIB:.1f}" if device.type == "cuda" else "-"


def target_cell(mode: str, task: str, resolution: int, steps: int, seconds: float, limit_gib: float | None) -> str:
    target = TARGETS_S.get((task, resolution, steps))
    if mode == "fp8" and (task, resolution, steps) == ("depth", 768, 1) and limit_gib is not None and limit_gib <= 24:
        target = FP8_24GB_TARGET_S
    if target is None or mode not in ("full", "fp8"):
        return ""
    return f"{'met' if seconds <= target else 'MISSED'} (<= {target:.2f} s)"


def config_arg(text: str) -> tuple[str, int, int]:
    """``task:px:steps`` -> (task, resolution, steps)."""
    try:
        task, resolution, steps = text.split(":")
        return task, int(resolution), int(steps)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TASK:PX:STEPS (e.g. depth:768:1), got {text!r}") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the tiny fixture model instead of FLUX.1 Kontext size")
    parser.add_argument("--modes", nargs="+", choices=MEMORY_MODES, default=list(MEMORY_MODES))
    parser.add_argument("--tasks", nargs="+", default=["depth", "matting"], help="normal costs what depth costs")
    parser.add_argument("--resolutions", nargs="+", type=int, default=None, help="default 768 1024 (tiny: 64)")
    parser.add_argument("--steps", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--configs", nargs="+", type=config_arg, metavar="TASK:PX:STEPS",
                        help="explicit runs (e.g. depth:768:1 matting:768:1 depth:768:8) instead of the product of "
                             "--tasks, --resolutions and --steps; the baseline runs each (px, steps) once")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--diff-against-full", action="store_true",
                        help="without 'full' in --modes: run the eager full path once per config (untimed) first, "
                             "to fill the diff column")
    parser.add_argument("--compile", dest="compile_mode", help="torch.compile mode: default, max-autotune, "
                                                               "reduce-overhead (CUDA graphs)")
    parser.add_argument("--attention-backend", help="diffusers attention backend, e.g. _native_flash, _native_cudnn")
    parser.add_argument("--channels-last-vae", action="store_true")
    parser.add_argument("--gpu-memory-limit-gib", type=float, help="cap the allocator, to act as a smaller card")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = torch.bfloat16
    resolutions = args.resolutions or ([64] if args.tiny else [768, 1024])
    configs = args.configs or [(task, r, steps) for task in args.tasks for r in resolutions for steps in args.steps]
    resolutions = sorted({r for _, r, _ in configs})
    if device.type == "cuda" and args.gpu_memory_limit_gib:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.gpu_memory_limit_gib * GIB / total), device)
    dit, vae = tiny_fixture() if args.tiny else random_flux_kontext(device)
    prompt = random_prompt(dit, device, dtype)
    images = {r: np.random.default_rng(r).integers(0, 256, (r, r, 3), dtype=np.uint8) for r in resolutions}
    point_maps = {r: np.pad(np.ones((r // 4, r // 4), np.float32), 3 * r // 8) for r in resolutions}

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}; torch {torch.__version__}; {'tiny fixture model' if args.tiny else 'FLUX.1 Kontext size, random'}"
          f" weights; bf16; compile={args.compile_mode}, attention={args.attention_backend or 'default (SDPA)'}, "
          f"channels-last VAE={args.channels_last_vae}; memory limit={args.gpu_memory_limit_gib or 'none'} GiB; "
          f"median of {args.repeats} after {args.warmup} warm-up runs")
    print("| what | task | px | steps | latency s | DiT s | VAE enc+dec s | peak GiB | weights GiB | "
          "max abs diff vs full | target |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")

    if not args.no_baseline:
        pipe = kontext_pipeline(dit, vae, device, dtype)
        for resolution, steps in dict.fromkeys((r, steps) for _, r, steps in configs):  # unique, in order
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds = latency(lambda r=resolution, n=steps: run_baseline(pipe, images[r], prompt, r, n), device,
                              args.repeats, args.warmup)
            print(f"| diffusers FluxKontextPipeline | - | {resolution} | {steps} | {seconds:.3f} | | | "
                  f"{peak_gib(device)} | | | |", flush=True)
        del pipe
        release()

    reference: dict[tuple, torch.Tensor] = {}  # output maps of the eager full bf16 path
    inputs = {r: (images[r], point_maps[r]) for r in resolutions}
    if args.diff_against_full and "full" not in args.modes:
        denoiser, codec = load_diffusers_backend(dit, vae, dtype, device, memory_mode="full")
        reference.update({config: run_perceive(denoiser, codec, prompt, inputs, *config).float().cpu()
                          for config in configs})
        del denoiser, codec
        release()
    for mode in args.modes:
        bench_mode(mode, dit, vae, prompt, inputs, configs, reference, args)
        release()


def run_perceive(denoiser, codec, prompt: PromptEmbeddings, inputs: dict, task: str, resolution: int,
                 steps: int) -> torch.Tensor:
    """One end-to-end run on the benchmark's input for ``resolution``: the output map."""
    image, point_map = inputs[resolution]
    return perceive(denoiser, codec, image, task, prompt, steps=steps, resolution=resolution,
                    point_map=point_map if task == "matting" else None).output


def bench_mode(mode: str, dit: DiTWeights, vae: VAEWeights, prompt: PromptEmbeddings, inputs: dict, configs: list,
               reference: dict, args: argparse.Namespace) -> None:
    """Load one memory mode and print a row per (task, resolution, steps); fills ``reference`` in mode full."""
    device, dtype = torch.device(args.device), torch.bfloat16
    denoiser, codec = load_diffusers_backend(dit, vae, dtype, device, memory_mode=mode)

    def run(task, r, steps, d=denoiser, c=codec):
        return run_perceive(d, c, prompt, inputs, task, r, steps)

    if mode == "full":  # before any speed-up, so compiled paths are compared with eager
        reference.update({config: run(*config).float().cpu() for config in configs})
    speed_up(denoiser, codec, compile_mode=args.compile_mode, attention_backend=args.attention_backend,
             channels_last_vae=args.channels_last_vae)
    weights = resident_gib(device)
    for config in configs:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = latency(lambda config=config: run(*config), device, args.repeats, args.warmup)
        peak = peak_gib(device)
        stages = stage_times(lambda d, c, config=config: run(*config, d=d, c=c), denoiser, codec, 1)
        output = run(*config).float().cpu()
        diff = f"{(output - reference[config]).abs().max():.4f}" if config in reference else ""
        target = target_cell(mode, *config, seconds, args.gpu_memory_limit_gib)
        task, resolution, steps = config
        print(f"| e2p {mode} | {task} | {resolution} | {steps} | {seconds:.3f} | {stages['dit']:.3f} | "
              f"{stages['encode'] + stages['decode']:.3f} | {peak} | {weights} | {diff} | {target} |", flush=True)


if __name__ == "__main__":
    main()
