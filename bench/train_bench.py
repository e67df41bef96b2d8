"""Training step time and peak GPU memory of ``python -m train`` at full FLUX.1 Kontext size, with random weights.

The DiT (19 double + 38 single blocks, hidden 3072, ~11.9 B parameters) and the Flux VAE are built on the meta device
and materialised in bf16 directly on the GPU with a random init (no checkpoint needed, no float32 copy), then each
configuration runs ``train.step.training_losses`` + backward + optimizer step exactly as the trainer does (bf16
autocast, gradient checkpointing, the reference LoRA over 304 Linears or a full fine-tune). Prints a table:

    python bench/train_bench.py [--modes lora,full] [--sizes 512x512,768x768] [--batch-sizes 1,2]
                                [--optimizer adamw|adamw8bit] [--steps 5] [--warmup 2]
    python bench/train_bench.py --tiny     # the fixture-sized model on the CPU: a smoke test of the script

"consistency" rows include the VAE decode with gradients (λ > 0, after the first epoch); "flow" rows are the first
epoch (λ = 0, no decode). A configuration that runs out of memory is reported as OOM.
"""

import argparse
import gc
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusers import AutoencoderKL  # noqa: E402

from e2p_core.backends.diffusers_backend import DiffusersCodec, DiffusersDenoiser, ReferenceFluxTransformer  # noqa: E402
from e2p_core.checkpoints import DiTArchitecture, VAEArchitecture  # noqa: E402
from e2p_core.prompts import PromptEmbeddings  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from train.model import add_lora, make_full_trainable  # noqa: E402
from train.step import ObjectiveConfig, training_losses  # noqa: E402
from train.trainer import make_optimizer  # noqa: E402

FLUX_DIT = DiTArchitecture(hidden_size=3072, num_heads=24, head_dim=128, num_double_blocks=19, num_single_blocks=38,
                           in_channels=64, out_channels=64, text_dim=4096, pooled_dim=768, guidance_embeds=True,
                           mlp_ratio=4.0, axes_dims_rope=(16, 56, 56))
FLUX_VAE = VAEArchitecture(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16)
TINY_DIT = DiTArchitecture(hidden_size=64, num_heads=4, head_dim=16, num_double_blocks=2, num_single_blocks=2,
                           in_channels=64, out_channels=64, text_dim=32, pooled_dim=32, guidance_embeds=True,
                           mlp_ratio=4.0, axes_dims_rope=(4, 6, 6))
TINY_VAE = VAEArchitecture(block_out_channels=(32, 64, 64, 64), layers_per_block=2, latent_channels=16)
TEXT_TOKENS = 512


def materialise(module: torch.nn.Module, device: torch.device, seed: int) -> torch.nn.Module:
    """Allocate a meta-device module on ``device`` (in the dtype it was built in) and fill it: ``U(±1/sqrt(fan_in))``
    matrices and convolutions, zero biases, unit norm scales (activations stay O(1), like a trained model's)."""
    module = module.to_empty(device=device)
    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if parameter.dim() >= 2:
                bound = 1 / math.sqrt(parameter[0].numel())
                parameter.uniform_(-bound, bound, generator=generator)
            elif name.endswith("bias"):
                parameter.zero_()
            else:
                parameter.fill_(1.0)
    return module


def build_models(dit: DiTArchitecture, vae: VAEArchitecture, device: torch.device):
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # parameters are created in bf16: no float32 copy is ever allocated
    try:
        with torch.device("meta"):
            transformer = ReferenceFluxTransformer(**dit.to_diffusers_config(), time_embedding="bf16")
            autoencoder = AutoencoderKL(**vae.to_diffusers_config())
    finally:
        torch.set_default_dtype(default_dtype)
    transformer = materialise(transformer, device, seed=0).requires_grad_(False)
    autoencoder = materialise(autoencoder, device, seed=1).requires_grad_(False).eval()
    return transformer, autoencoder


def random_batch(batch: int, size_hw: tuple[int, int]) -> dict:
    """A depth training batch of noise images (the step's cost does not depend on the content)."""
    generator = torch.Generator().manual_seed(0)
    return {"image": torch.rand(batch, 3, *size_hw, generator=generator) * 2 - 1,
            "target": torch.rand(batch, 3, *size_hw, generator=generator) * 2 - 1,
            "valid": torch.ones(batch, *size_hw, dtype=torch.bool)}


def measure(transformer, codec, prompt, optimizer_name: str, batch: int, size_hw: tuple[int, int],
            consistency: bool, steps: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """(seconds per optimizer step, peak GPU GiB) of one configuration."""
    parameters = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = make_optimizer(TrainConfig(optimizer=optimizer_name, learning_rate=1e-5), parameters)
    # λ > 0 from the second epoch on: steps_per_epoch = 1 and start 0 puts every measured step there
    objective = ObjectiveConfig("depth", "paper", lambda_start_epoch=0.0 if consistency else 1e9)
    denoiser = DiffusersDenoiser(transformer, torch.bfloat16, device)
    generator = torch.Generator().manual_seed(0)
    samples = random_batch(batch, size_hw)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            losses = training_losses(denoiser, codec, prompt, samples, objective, generator, step=1 + step,
                                     steps_per_epoch=1)
        losses["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    del optimizer
    return seconds, peak


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="fixture-sized model on the CPU (smoke test)")
    parser.add_argument("--modes", default="lora,full", help="comma list of lora, full")
    parser.add_argument("--sizes", default="512x512,768x768", help="comma list of HxW training sizes")
    parser.add_argument("--batch-sizes", default="1,2", help="comma list of per-GPU batch sizes")
    parser.add_argument("--optimizer", default="adamw8bit", choices=("adamw", "adamw8bit"))
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    args = parser.parse_args(argv)
    if args.tiny:
        dit_arch, vae_arch, device = TINY_DIT, TINY_VAE, torch.device("cpu")
        sizes, batches, optimizer_name = [(32, 32)], [1], "adamw"
        steps, warmup = 1, 0
    else:
        if not torch.cuda.is_available():
            parser.error("needs a CUDA GPU (or --tiny)")
        dit_arch, vae_arch, device = FLUX_DIT, FLUX_VAE, torch.device("cuda")
        sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes.split(",")]
        batches, optimizer_name = [int(b) for b in args.batch_sizes.split(",")], args.optimizer
        steps, warmup = args.steps, args.warmup
    generator = torch.Generator().manual_seed(0)
    prompt = PromptEmbeddings(torch.randn(1, TEXT_TOKENS, dit_arch.text_dim, generator=generator),
                              torch.randn(1, dit_arch.pooled_dim, generator=generator)).to(device, torch.bfloat16)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"# {device_name}; DiT hidden {dit_arch.hidden_size}, {dit_arch.num_double_blocks}+"
          f"{dit_arch.num_single_blocks} blocks; bf16 autocast, gradient checkpointing, {optimizer_name}")
    print("| mode | rank | HxW | batch | loss | trainable params | s/step | peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for mode in args.modes.split(","):
        transformer, autoencoder = build_models(dit_arch, vae_arch, device)
        if mode == "lora":
            add_lora(transformer, args.lora_rank, dtype=torch.float32)
        else:
            make_full_trainable(transformer, torch.bfloat16)
        transformer.enable_gradient_checkpointing()
        autoencoder.enable_gradient_checkpointing()
        transformer.train()
        codec = DiffusersCodec(autoencoder)
        trainable = sum(p.numel() for p in transformer.parameters() if p.requires_grad)
        for size_hw in sizes:
            for batch in batches:
                for consistency in (False, True):
                    try:
                        seconds, peak = measure(transformer, codec, prompt, optimizer_name, batch, size_hw,
                                                consistency, steps, warmup, device)
                        timing, memory = f"{seconds:.3f}", "-" if math.isnan(peak) else f"{peak:.1f}"
                    except torch.OutOfMemoryError:
                        timing, memory = "OOM", "OOM"
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    rank = args.lora_rank if mode == "lora" else "-"
                    print(f"| {mode} | {rank} | {size_hw[0]}x{size_hw[1]} | {batch} | "
                          f"{'flow+consistency' if consistency else 'flow'} | {trainable / 1e6:.1f} M | {timing} | "
                          f"{memory} |", flush=True)
        del transformer, autoencoder, codec
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
