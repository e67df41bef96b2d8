"""Per-stage CPU times of the tiny fixture model (tests/fixtures/e2p_tiny), for regression tracking.

The Denoiser and LatentCodec handed to ``e2p_core.pipeline.perceive`` are wrapped in timing proxies
(``bench/timing.py``); "other" is everything else: resizing and normalising the image, the point map, noise,
token packing, the Euler updates, postprocessing and restoring the input size. Prints a markdown table.

    python bench/cpu_stages.py [--resolutions 64 128 256] [--steps 1 4] [--repeats 7] [--dtype fp32|bf16]
"""

import argparse
import platform
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from gpu_inference import FIXTURES, tiny_fixture  # noqa: E402
from timing import stage_times  # noqa: E402

from e2p_core.backends.diffusers_backend import load_diffusers_backend  # noqa: E402
from e2p_core.backends.memory import MEMORY_MODES  # noqa: E402
from e2p_core.cli_models import DTYPES  # noqa: E402
from e2p_core.images import load_image_rgb  # noqa: E402
from e2p_core.pipeline import perceive  # noqa: E402
from e2p_core.prompts import PromptEmbeddings  # noqa: E402


def tiny_prompts(dtype: torch.dtype) -> dict[str, PromptEmbeddings]:
    """The fixture's stand-ins for the T5 and CLIP embeddings of the three task prompts."""
    arrays = np.load(FIXTURES / "inputs.npz")
    return {task: PromptEmbeddings(torch.from_numpy(arrays[f"{task}_t5_emb"]),
                                   torch.from_numpy(arrays[f"{task}_pooled_emb"])).to("cpu", dtype)
            for task in ("depth", "normal", "matting")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["depth", "normal", "matting"])
    parser.add_argument("--resolutions", nargs="+", type=int, default=[64, 128, 256])
    parser.add_argument("--steps", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--memory-mode", choices=MEMORY_MODES, default="full")
    args = parser.parse_args(argv)

    dtype = DTYPES[args.dtype]
    denoiser, codec = load_diffusers_backend(*tiny_fixture(), dtype, "cpu", memory_mode=args.memory_mode)
    prompts = tiny_prompts(dtype)
    image = load_image_rgb(FIXTURES / "input.png")  # 64 x 48; resized to each processing size
    point_map = np.zeros(image.shape[:2], np.float32)
    point_map[16:32, 24:40] = 1.0

    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, torch "
          f"{torch.__version__}, tiny fixture model, {args.dtype}, memory mode {args.memory_mode}, fastest "
          f"of {args.repeats} runs")
    print("| task | processing px | steps | encode ms | DiT ms | decode ms | other ms | total ms |")
    print("|---|---|---|---|---|---|---|---|")
    for task in args.tasks:
        for resolution in args.resolutions:
            for steps in args.steps:
                def run(timed_denoiser, timed_codec, task=task, resolution=resolution, steps=steps):
                    return perceive(timed_denoiser, timed_codec, image, task, prompts[task], steps=steps,
                                    resolution=resolution, point_map=point_map if task == "matting" else None)

                run(denoiser, codec)  # warm-up
                times = stage_times(run, denoiser, codec, args.repeats)
                cells = " | ".join(f"{times[name] * 1000:.1f}" for name in ("encode", "dit", "decode", "other",
                                                                               "total"))
                print(f"| {task} | {resolution} | {steps} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
