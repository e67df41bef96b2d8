"""Host (CPU) peak memory of every way of loading the DiT, at FLUX width, as multiples of the checkpoint size.

Writes a random FLUX-width DiT with fewer blocks (default 3072 wide, 4 double + 8 single blocks: 5.1 GB in bf16,
BFL naming), the same model in DiffSynth naming and as a Q8_0 ``.gguf``, and a rank-16 kohya LoRA on every block
Linear. Then, each in a fresh interpreter and one after another, it loads through one path and reads every weight
once (as the first inference does; a weight never read stays out of memory when it is memory-mapped), and reports
the process's peak resident set (``VmHWM``: file pages included) and its peak anonymous memory (``RssAnon``,
sampled every 5 ms; the part the kernel cannot drop), both above the interpreter's own after the imports, as
multiples of the file's size, and that peak scaled to the real 23.8 GB checkpoint. Paths:

* ``cli-*``: what ``python -m e2p_core predict`` loads (``cli_models.load_model``: ``load_dit`` / GGUF, then the
  diffusers backend on the CPU): ``full`` without and with the LoRA, memory modes ``fp8`` and ``gguf`` with it, the
  ``.gguf`` file with it, and the DiffSynth file (an E2P full checkpoint) on its own;
* ``comfy-e2p``: this pack's loader node (``load_e2p_model``) with the LoRA, then ComfyUI loading it for a run;
* ``comfy-core``: core ``UNETLoader`` + ``LoraLoaderModelOnly`` on the same files, the same way, side by side.

    python bench/host_memory.py --workdir /tmp/e2p_hostmem            # 5.1 GB model: ~15 GB of disk, minutes
    python bench/host_memory.py --small --paths cli-lora cli-gguf     # a tiny model, seconds (the smoke test)

The files are written once into ``--workdir`` and reused; delete it afterwards.
"""

import argparse
import gc
import importlib
import json
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

LORA_RANK = 16
REAL_CHECKPOINT_GB = 23.8  # an E2P full checkpoint / FLUX.1 Kontext [dev] in bf16
VAE = REPO / "tests" / "fixtures" / "e2p_tiny" / "vae_bfl.safetensors"
PATHS = ("cli-full", "cli-lora", "cli-fp8", "cli-gguf", "cli-gguf-file", "cli-diffsynth", "comfy-e2p", "comfy-core")
DESCRIPTIONS = {
    "cli-full": "CLI, BFL file, memory mode full",
    "cli-lora": "CLI, BFL file + LoRA, full",
    "cli-fp8": "CLI, BFL file + LoRA, memory mode fp8",
    "cli-gguf": "CLI, BFL file + LoRA, memory mode gguf (Q8_0 on load)",
    "cli-gguf-file": "CLI, Q8_0 .gguf file + LoRA, gguf",
    "cli-diffsynth": "CLI, DiffSynth file (E2P full checkpoint), full",
    "comfy-e2p": "ComfyUI, this pack's loader + LoRA, loaded for a run",
    "comfy-core": "ComfyUI, core UNETLoader + LoraLoaderModelOnly, loaded for a run",
}


# ------------------------------------------------------------------------------------------------ measuring


class AnonymousPeak:
    """Samples RssAnon (memory not backed by a file) every few ms in a thread; the kernel keeps no peak of it.
    Memory-mapped weights count in RSS as file pages, which the kernel can drop and read again under pressure."""

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


def is_mapped(path: Path) -> bool:
    """Whether this process still maps ``path`` (so its pages stay resident while it lives)."""
    return any(line.endswith(" " + str(path.resolve())) for line in Path("/proc/self/maps").read_text().splitlines())


def read_every_weight(module: torch.nn.Module) -> None:
    """Fault in every byte of every weight, as a forward pass does, without a full-size temporary."""
    for tensor in [*module.parameters(), *module.buffers()]:
        raw = tensor.as_tensor() if hasattr(tensor, "as_tensor") else tensor.detach()  # GGUF blocks: their bytes
        if raw.numel() and raw.device.type == "cpu":
            (raw.reshape(-1) if raw.is_contiguous() else raw.contiguous().view(-1)).view(torch.uint8).max()


# ------------------------------------------------------------------------------------------------ the children


def load_with_cli(files: dict, path_name: str):
    """``cli_models.load_model`` with the options ``predict`` would get; returns the transformer."""
    from e2p_core.cli_models import add_model_arguments, load_model

    dit = {"cli-gguf-file": files["gguf"], "cli-diffsynth": files["diffsynth"]}.get(path_name, files["bfl"])
    argv = ["--dit", dit, "--vae", str(VAE), "--device", "cpu", "--dtype", "bf16", "--memory-mode",
            {"cli-fp8": "fp8", "cli-gguf": "gguf", "cli-gguf-file": "gguf"}.get(path_name, "full")]
    if path_name not in ("cli-full", "cli-diffsynth"):
        argv += ["--lora", files["lora"]]
    if files.get("config"):
        argv += ["--dit-config", files["config"]]
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    denoiser, _, _ = load_model(parser.parse_args(argv), torch.device("cpu"), torch.bfloat16)
    return denoiser.transformer, Path(dit)


def load_with_comfy(files: dict, path_name: str):
    """A ComfyUI MODEL from this pack's loader or core UNETLoader + LoraLoaderModelOnly, loaded as for a run
    (ComfyUI patches the LoRA into the weights then); returns the diffusion model."""
    sys.path.insert(0, str(REPO / "tests"))
    from comfy_support import load_pack

    pack = load_pack()
    import comfy.model_management
    import comfy.sd
    import comfy.utils

    if path_name == "comfy-e2p":
        loader = importlib.import_module(f"{pack.__name__}.nodes.loader")
        model = loader.load_e2p_model(files["bfl"], "default", files["lora"], 1.0)
    else:
        model = comfy.sd.load_diffusion_model(files["bfl"])
        lora = comfy.utils.load_torch_file(files["lora"], safe_load=True)
        model, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    comfy.model_management.load_models_gpu([model])  # CPU mode: the LoRA is patched into the weights here
    return model.model.diffusion_model, Path(files["bfl"])


def measure(files: dict, path_name: str) -> dict:
    """In the child: import, load through ``path_name``, read every weight; peaks in MiB, time in s."""
    import e2p_core.backends.diffusers_backend  # noqa: F401  (the imports every path pays before loading)
    import e2p_core.backends.gguf  # noqa: F401
    import e2p_core.cli_models  # noqa: F401

    if path_name.startswith("comfy"):
        sys.path.insert(0, str(REPO / "tests"))
        from comfy_support import load_pack

        load_pack()
    row = {"imports_mib": status_mib("VmHWM"), "imports_anon_mib": status_mib("RssAnon")}
    anonymous = AnonymousPeak()
    start = time.perf_counter()
    loader = load_with_comfy if path_name.startswith("comfy") else load_with_cli
    model, dit_file = loader(files, path_name)
    gc.collect()
    row["load_s"] = time.perf_counter() - start
    row["after_load_mib"] = status_mib("VmRSS")
    row["file_mapped"] = is_mapped(dit_file)
    read_every_weight(model)
    row["peak_mib"], row["anon_peak_mib"] = status_mib("VmHWM"), anonymous.stop()
    row["file_bytes"], row["file"] = dit_file.stat().st_size, dit_file.name
    return row


# ------------------------------------------------------------------------------------------------ the files


def write_safetensors_streaming(path: Path, shapes: dict[str, torch.Size], make) -> None:
    """A bf16 safetensors file written one tensor at a time (``make(key)`` gives it), never the model in memory."""
    from e2p_core.checkpoints import write_atomically

    offsets, position = {}, 0
    for key, shape in shapes.items():
        size = 2 * torch.Size(shape).numel()
        offsets[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [position, position + size]}
        position += size
    header = json.dumps(offsets, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)

    def write(temp_name: str) -> None:
        with open(temp_name, "wb") as handle:
            handle.write(struct.pack("<Q", len(header)) + header)
            for key, shape in shapes.items():
                tensor = make(key).to(torch.bfloat16).contiguous()
                assert tensor.shape == shape, key
                handle.write(tensor.view(torch.uint8).numpy().tobytes())

    write_atomically(path, write)


def make_files(workdir: Path, hidden: int, double: int, single: int) -> dict:
    """The BFL, DiffSynth and Q8_0 GGUF files of one random model, its LoRA (and, below FLUX's head count, the
    config giving RoPE axes), written once into ``workdir``."""
    from diffusers import FluxTransformer2DModel

    from e2p_core.backends.gguf import quantize
    from e2p_core.checkpoints import (
        LoraPair,
        bfl_to_diffsynth,
        diffusers_to_bfl,
        load_state_dict,
        lora_to_kohya,
        save_safetensors_atomic,
    )

    workdir.mkdir(parents=True, exist_ok=True)
    stem = f"dit_{hidden}_{double}_{single}"
    files = {"bfl": workdir / f"{stem}.safetensors", "diffsynth": workdir / f"{stem}_diffsynth.safetensors",
             "gguf": workdir / f"{stem}_Q8_0.gguf", "lora": workdir / f"{stem}_lora.safetensors"}
    heads = hidden // 128 if hidden % 128 == 0 and hidden >= 3072 else 24
    head_dim = hidden // heads
    if head_dim != 128:  # a small model: its RoPE axes must be given (as --dit-config / the node's sidecar json)
        axes = [head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8]
        files["config"] = files["bfl"].with_suffix(".json")
        files["config"].write_text(json.dumps({"axes_dims_rope": axes}))
    with torch.device("meta"):
        model = FluxTransformer2DModel(num_layers=double, num_single_layers=single, attention_head_dim=head_dim,
                                       num_attention_heads=heads, guidance_embeds=True,
                                       axes_dims_rope=tuple(axes) if head_dim != 128 else (16, 56, 56))
    shapes = {key: meta.shape for key, meta in diffusers_to_bfl(model.state_dict()).items()}

    def random_weight(key: str) -> torch.Tensor:
        generator = torch.Generator().manual_seed(list(shapes).index(key))
        return torch.randn(shapes[key], generator=generator) * 0.02

    if not files["bfl"].exists():
        write_safetensors_streaming(files["bfl"], shapes, random_weight)
    if not files["diffsynth"].exists() or not files["gguf"].exists():
        mapped = load_state_dict(files["bfl"])
        if not files["diffsynth"].exists():
            renamed = bfl_to_diffsynth(mapped)
            write_safetensors_streaming(files["diffsynth"], {k: v.shape for k, v in renamed.items()}, renamed.get)
        if not files["gguf"].exists():
            write_q8_0_gguf(files["gguf"], mapped, quantize)
        del mapped
    if not files["lora"].exists():
        generator = torch.Generator().manual_seed(-1 % 2**63)
        pairs = {key.removesuffix(".weight"): LoraPair(torch.randn(LORA_RANK, shape[1], generator=generator) * 0.01,
                                                       torch.randn(shape[0], LORA_RANK, generator=generator) * 0.01)
                 for key, shape in shapes.items() if key.endswith(".weight") and len(shape) == 2 and "blocks." in key}
        save_safetensors_atomic(lora_to_kohya(pairs), files["lora"])
    return {key: str(path) for key, path in files.items()}


def write_q8_0_gguf(path: Path, state_dict_bfl: dict, quantize) -> None:
    """City96-style FLUX GGUF: Linear weights Q8_0, the rest F32, BFL names; written tensor by tensor."""
    import gguf
    import numpy as np

    from e2p_core.checkpoints import write_atomically

    def array(key: str, value: torch.Tensor) -> np.ndarray:
        return quantize(value).as_tensor().numpy() if value.ndim == 2 else value.float().numpy()

    def write(temp_name: str) -> None:
        writer = gguf.GGUFWriter(temp_name, arch="flux")
        q8_0 = gguf.GGMLQuantizationType.Q8_0
        for key, value in state_dict_bfl.items():
            if value.ndim == 2:
                rows, cols = value.shape
                writer.add_tensor_info(key, (rows, cols // 32 * 34), np.dtype(np.uint8), rows * cols // 32 * 34,
                                       raw_dtype=q8_0)
            else:
                writer.add_tensor_info(key, tuple(value.shape), np.dtype(np.float32), 4 * value.numel())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for key, value in state_dict_bfl.items():
            writer.write_tensor_data(array(key, value))
        writer.close()

    write_atomically(path, write)


# ------------------------------------------------------------------------------------------------ the table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/e2p_hostmem"))
    parser.add_argument("--hidden", type=int, default=3072, help="width (3072: FLUX's)")
    parser.add_argument("--double", type=int, default=4, help="double blocks (FLUX: 19)")
    parser.add_argument("--single", type=int, default=8, help="single blocks (FLUX: 38)")
    parser.add_argument("--small", action="store_true", help="a tiny model (384 wide, 1 + 1 blocks): smoke runs")
    parser.add_argument("--paths", nargs="+", choices=PATHS, help="what to measure (default: all; with --small "
                                                                   "all but comfy-core, whose Flux detection "
                                                                   "needs 128-wide heads)")
    parser.add_argument("--child", nargs=2, metavar=("FILES_JSON", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(json.loads(args.child[0]), args.child[1])))
        return
    if args.small:
        args.hidden, args.double, args.single = 384, 1, 1
    paths = args.paths or [path for path in PATHS if not (args.small and path == "comfy-core")]

    files = make_files(args.workdir, args.hidden, args.double, args.single)
    bf16_gib = Path(files["bfl"]).stat().st_size / 2**30
    print(f"DiT {args.hidden} wide, {args.double} double + {args.single} single blocks: {bf16_gib:.2f} GiB in bf16; "
          f"LoRA rank {LORA_RANK} on every block Linear; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| path | file | file GiB | RSS after imports GiB | peak RSS, x file | peak anonymous, x file | "
          "RSS after load, x file | file still mapped | load s | peak RSS at 23.8 GB, GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for path_name in paths:
        done = subprocess.run([sys.executable, __file__, "--child", json.dumps(files), path_name],
                              capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{path_name} failed (exit status {done.returncode}):\n{done.stderr[-3000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        file_mib = row["file_bytes"] / 2**20
        peak = (row["peak_mib"] - row["imports_mib"]) / file_mib
        anonymous = (row["anon_peak_mib"] - row["imports_anon_mib"]) / file_mib
        after_load = (row["after_load_mib"] - row["imports_mib"]) / file_mib
        real_gib = REAL_CHECKPOINT_GB * 1e9 / 2**30 * row["file_bytes"] / Path(files["bfl"]).stat().st_size
        print(f"| {DESCRIPTIONS[path_name]} | {row['file']} "
              f"| {file_mib / 1024:.2f} | {row['imports_mib'] / 1024:.2f} | {peak:.2f} | {anonymous:.2f} "
              f"| {after_load:.2f} | {'yes' if row['file_mapped'] else 'no'} | {row['load_s']:.1f} "
              f"| {peak * real_gib + row['imports_mib'] / 1024:.1f} |", flush=True)


if __name__ == "__main__":
    main()
