"""Host (CPU) peak memory of loading a DiT: ``load_dit`` (+ LoRA merge) and ``load_diffusers_backend``.

Builds a mid-size random Flux DiT in BFL naming (default ~0.64 B params, 1.2 GiB bf16) and a rank-16 kohya LoRA over
every Linear the released LoRAs touch, then measures, in a fresh interpreter per configuration, the peak resident
set size (``VmHWM``) after the imports, after ``load_dit`` and after building the backend, and the peak anonymous
memory (``RssAnon``, sampled). Prints a table.

    python bench/host_memory.py --workdir /tmp/e2p_hostmem [--hidden 1536 --double 4 --single 8] [--memory-mode ...]
"""

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

LORA_RANK = 16


class AnonymousPeak:
    """Samples RssAnon (memory not backed by a file) every few ms in a thread; the kernel keeps no peak of it.
    Memory-mapped weights count in RSS as file pages, which the kernel can drop and re-read under pressure."""

    def __init__(self, interval_s: float = 0.005):
        self.peak_mib, self.interval_s = 0.0, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak_mib = max(self.peak_mib, status_mib("RssAnon"))
            time.sleep(self.interval_s)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak_mib, status_mib("RssAnon"))


def status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM). Not ``ru_maxrss``: that one survives exec and would report the
    parent's peak."""
    return status_mib("VmHWM")


def make_checkpoint(workdir: Path, hidden: int, double: int, single: int) -> tuple[Path, Path]:
    """A random BFL-named DiT (bf16) and a kohya LoRA for it, written once."""
    from diffusers import FluxTransformer2DModel

    from e2p_core.checkpoints import LoraPair, diffusers_to_bfl, lora_to_kohya, save_safetensors_atomic

    dit_path, lora_path = workdir / f"dit_{hidden}_{double}_{single}.safetensors", workdir / "lora.safetensors"
    if dit_path.exists() and lora_path.exists():
        return dit_path, lora_path
    workdir.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = FluxTransformer2DModel(num_layers=double, num_single_layers=single, attention_head_dim=128,
                                       num_attention_heads=hidden // 128, guidance_embeds=True)
    generator = torch.Generator().manual_seed(0)
    random_sd = {key: (torch.randn(meta.shape, generator=generator) * 0.02).to(torch.bfloat16)
                 for key, meta in model.state_dict().items()}
    bfl = diffusers_to_bfl(random_sd)
    save_safetensors_atomic(bfl, dit_path)
    pairs = {}
    for key, weight in bfl.items():
        if key.endswith(".weight") and weight.ndim == 2 and ("blocks." in key):
            out_features, in_features = weight.shape
            pairs[key[: -len(".weight")]] = LoraPair(torch.randn(LORA_RANK, in_features, generator=generator) * 0.01,
                                                     torch.randn(out_features, LORA_RANK, generator=generator) * 0.01)
    save_safetensors_atomic(lora_to_kohya(pairs), lora_path)
    return dit_path, lora_path


def measure(dit_path: str, lora_path: str | None, memory_mode: str | None) -> dict:
    """Runs in the child interpreter: load, build, report peaks (MiB) and times (s)."""
    from e2p_core.backends.diffusers_backend import load_diffusers_backend
    from e2p_core.weights import load_dit, load_vae

    vae = load_vae(REPO / "tests" / "fixtures" / "e2p_tiny" / "vae_bfl.safetensors")
    row = {"imports_mib": peak_rss_mib(), "imports_anon_mib": status_mib("RssAnon")}
    anonymous = AnonymousPeak()
    start = time.perf_counter()
    dit = load_dit(dit_path, loras=[(lora_path, 1.0)] if lora_path else [])
    row["load_dit_mib"], row["load_dit_s"] = peak_rss_mib(), time.perf_counter() - start
    start = time.perf_counter()
    kwargs = {"memory_mode": memory_mode} if memory_mode else {}
    load_diffusers_backend(dit, vae, torch.bfloat16, "cpu", **kwargs)
    row["backend_mib"], row["backend_s"] = peak_rss_mib(), time.perf_counter() - start
    row["anon_peak_mib"] = anonymous.stop()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/e2p_hostmem"))
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--double", type=int, default=4)
    parser.add_argument("--single", type=int, default=8)
    parser.add_argument("--memory-mode", action="append", default=[], help="also measure these modes")
    parser.add_argument("--child", nargs=3, metavar=("DIT", "LORA", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        dit, lora, mode = args.child
        print(json.dumps(measure(dit, None if lora == "-" else lora, None if mode == "-" else mode)))
        return

    dit_path, lora_path = make_checkpoint(args.workdir, args.hidden, args.double, args.single)
    size_mib = dit_path.stat().st_size / 2**20
    print(f"DiT file {dit_path.name}: {size_mib:.0f} MiB (bf16); LoRA rank {LORA_RANK}; torch threads "
          f"{torch.get_num_threads()}")
    print("| config | RSS after imports MiB | peak RSS, load_dit MiB | peak RSS, + backend MiB | "
          "peak RSS - imports, x file | peak anonymous - imports, x file | load_dit s | backend s |")
    print("|---|---|---|---|---|---|---|---|")
    for lora in ("-", str(lora_path)):
        for mode in ["-", *args.memory_mode]:
            out = subprocess.run([sys.executable, __file__, "--child", str(dit_path), lora, mode],
                                 capture_output=True, text=True, check=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            name = ("with LoRA" if lora != "-" else "no LoRA") + (f", {mode}" if mode != "-" else "")
            ratio = (row["backend_mib"] - row["imports_mib"]) / size_mib
            anon_ratio = (row["anon_peak_mib"] - row["imports_anon_mib"]) / size_mib
            print(f"| {name} | {row['imports_mib']:.0f} | {row['load_dit_mib']:.0f} | {row['backend_mib']:.0f} | "
                  f"{ratio:.2f} | {anon_ratio:.2f} | {row['load_dit_s']:.2f} | {row['backend_s']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
