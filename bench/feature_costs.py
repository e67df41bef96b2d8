"""What the video, tiling and shared-encode features cost, in model calls and seconds, on the tiny fixture model.

Counts come from proxies around the Denoiser and LatentCodec (``bench/timing.py``): DiT calls, and frames through
the VAE encoder and decoder. They are what a GPU run would do at full size; the seconds are the tiny model's on this
machine. Prints a markdown table, one line per feature.

    python bench/feature_costs.py [--resolution 64] [--frames 24] [--tiles 3] [--size 270x480]
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from cpu_stages import tiny_prompts  # noqa: E402
from gpu_inference import tiny_fixture  # noqa: E402
from timing import StageClock, TimedCodec, TimedDenoiser  # noqa: E402

from e2p_core.backends.diffusers_backend import load_diffusers_backend  # noqa: E402
from e2p_core.pipeline import encode_image, perceive  # noqa: E402
from e2p_core.tiling import perceive_tiled  # noqa: E402
from e2p_core.video import align_depth_video  # noqa: E402


class Counting:
    """DiT calls and VAE frames through the timing proxies."""

    def __init__(self, denoiser, codec):
        self.clock = StageClock(denoiser.device)
        self.dit_calls = self.encoded = self.decoded = 0
        timed_denoiser, timed_codec = TimedDenoiser(denoiser, self.clock), TimedCodec(codec, self.clock)
        self.dtype, self.device = denoiser.dtype, denoiser.device

        def dit(*args, **kwargs):
            self.dit_calls += 1
            return timed_denoiser(*args, **kwargs)

        def encode(pixels):
            self.encoded += pixels.shape[0]
            return timed_codec.encode(pixels)

        def decode(latents):
            self.decoded += latents.shape[0]
            return timed_codec.decode(latents)

        self.denoiser, self.encode, self.decode = dit, encode, decode
        self.denoiser.dtype, self.denoiser.device = denoiser.dtype, denoiser.device


def measure(name: str, run, denoiser, codec) -> str:
    counting = Counting(denoiser, codec)
    start = time.perf_counter()
    run(counting.denoiser, counting)
    seconds = time.perf_counter() - start
    return f"| {name} | {counting.dit_calls} | {counting.encoded} | {counting.decoded} | {seconds:.2f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--tiles", type=int, default=3)
    parser.add_argument("--size", default="270x480", help="HxW of the test frames")
    args = parser.parse_args()
    height, width = (int(v) for v in args.size.split("x"))

    torch.manual_seed(0)
    dit, vae = tiny_fixture()
    denoiser, codec = load_diffusers_backend(dit, vae, torch.float32, "cpu")
    prompts = tiny_prompts(torch.float32)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    clip = rng.integers(0, 256, (args.frames, height, width, 3), dtype=np.uint8)
    no_points = np.zeros((height, width), np.float32)
    resolution = args.resolution

    def one(den, cod, task="depth", images=image, **kwargs):
        point_map = no_points if task == "matting" else None
        return perceive(den, cod, images, task, prompts[task], resolution=resolution, point_map=point_map, **kwargs)

    def three_tasks(den, cod):
        for task in ("depth", "normal", "matting"):
            one(den, cod, task)

    def three_tasks_shared(den, cod):
        encoded = encode_image(cod, image, resolution=resolution)
        for task in ("depth", "normal", "matting"):
            one(den, cod, task, encoded=encoded)

    def tiled(den, cod):
        perceive_tiled(lambda img, pts, pmap: one(den, cod, images=img).output[0], image, "depth", args.tiles)

    def video(den, cod, temporal):
        outputs = torch.cat([one(den, cod, images=clip[i:i + 4]).output for i in range(0, len(clip), 4)])
        if temporal:
            align_depth_video(outputs, "aligned", images=clip)  # frames matched by optical flow

    print(f"Feature costs, tiny model, {width}x{height} frames at processing size {resolution}, CPU "
          f"({torch.get_num_threads()} threads)\n")
    print("| feature | DiT calls | VAE encoded frames | VAE decoded frames | seconds |")
    print("|---|---|---|---|---|")
    print(measure("one image, depth", one, denoiser, codec))
    print(measure("depth + normal + matting, separate encodes", three_tasks, denoiser, codec))
    print(measure("depth + normal + matting, one shared encode", three_tasks_shared, denoiser, codec))
    print(measure(f"depth, tiles {args.tiles} (global + tiles)", tiled, denoiser, codec))
    print(measure(f"video {args.frames} frames, independent", lambda d, c: video(d, c, False), denoiser, codec))
    print(measure(f"video {args.frames} frames, temporal alignment", lambda d, c: video(d, c, True), denoiser,
                  codec))


if __name__ == "__main__":
    main()
