"""Host (CPU) peak memory and time of loading FLUX's text encoders from ComfyUI single files.

Writes random encoders in ComfyUI's naming once: CLIP-L at its real size (``clip_l.safetensors``, 12 layers, 246 MB
fp16) and T5-XXL at its real width with fewer blocks (``t5xxl_fp16.safetensors`` and its scaled-fp8 variant; the real
file has 24 blocks, 9.79 GB). Then, in a fresh interpreter per file, measures ``text_encoders.load_single_file`` into
the compute dtype: the peak resident set (``VmHWM``) and the peak anonymous memory (``RssAnon``, sampled) above the
interpreter's after its imports, as multiples of the file and of the loaded model, and the load time. Prints a table.

    python bench/text_encoder_memory.py --workdir /tmp/e2p_text_encoders [--t5-blocks 2] [--dtype bf16]
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from host_memory import AnonymousPeak, status_mib  # noqa: E402 (the same probes as the DiT bench)

REAL_T5_BLOCKS, REAL_T5_BYTES = 24, 9_787_841_024
# What a CLIP-L tokenizer tells the loader (the pooled vector is read at its end token).
CLIP_L_SPECIAL_IDS = SimpleNamespace(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


def clip_l_shapes(width: int = 768) -> dict[str, tuple[int, ...]]:
    """clip_l.safetensors: OpenAI CLIP ViT-L/14's text tower (``width`` 768), ComfyUI naming."""
    mlp = 4 * width
    shapes = {"text_model.embeddings.token_embedding.weight": (49408, width),
              "text_model.embeddings.position_embedding.weight": (77, width),
              "text_model.final_layer_norm.weight": (width,), "text_model.final_layer_norm.bias": (width,),
              "text_projection.weight": (width, width)}
    for layer in range(12):
        prefix = f"text_model.encoder.layers.{layer}."
        linears = {"self_attn.q_proj": (width, width), "self_attn.k_proj": (width, width),
                   "self_attn.v_proj": (width, width), "self_attn.out_proj": (width, width),
                   "mlp.fc1": (mlp, width), "mlp.fc2": (width, mlp)}
        for name, (out_features, in_features) in linears.items():
            shapes[f"{prefix}{name}.weight"] = (out_features, in_features)
            shapes[f"{prefix}{name}.bias"] = (out_features,)
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[f"{prefix}{norm}.weight"], shapes[f"{prefix}{norm}.bias"] = (width,), (width,)
    return shapes


def t5_xxl_shapes(blocks: int, width: int = 4096) -> dict[str, tuple[int, ...]]:
    """t5xxl_fp16.safetensors with ``blocks`` blocks: T5 v1.1 XXL's encoder (``width`` 4096, 64 heads), ComfyUI
    naming."""
    mlp = width * 10240 // 4096
    shapes = {"shared.weight": (32128, width), "encoder.final_layer_norm.weight": (width,),
              "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (32, width // 64)}
    for block in range(blocks):
        prefix = f"encoder.block.{block}.layer."
        for name in "qkvo":
            shapes[f"{prefix}0.SelfAttention.{name}.weight"] = (width, width)
        shapes[f"{prefix}0.layer_norm.weight"] = shapes[f"{prefix}1.layer_norm.weight"] = (width,)
        shapes[f"{prefix}1.DenseReluDense.wi_0.weight"] = shapes[f"{prefix}1.DenseReluDense.wi_1.weight"] = (mlp, width)
        shapes[f"{prefix}1.DenseReluDense.wo.weight"] = (width, mlp)
    return shapes


def write_files(workdir: Path, t5_blocks: int, divisor: int) -> dict[str, tuple[Path, str]]:
    """{label: (file, encoder kind)}, written once into ``workdir`` (widths divided by ``divisor``)."""
    from e2p_core.checkpoints import save_safetensors_atomic

    workdir.mkdir(parents=True, exist_ok=True)
    size = f"_{divisor}" if divisor > 1 else ""
    files = {"clip_l fp16": (workdir / f"clip_l{size}.safetensors", "clip"),
             f"t5xxl fp16, {t5_blocks} blocks": (workdir / f"t5xxl_fp16_{t5_blocks}{size}.safetensors", "t5"),
             f"t5xxl scaled fp8, {t5_blocks} blocks": (workdir / f"t5xxl_fp8_scaled_{t5_blocks}{size}.safetensors",
                                                       "t5")}
    generator = torch.Generator().manual_seed(0)
    for label, (path, kind) in files.items():
        if path.exists():
            continue
        shapes = clip_l_shapes(768 // divisor) if kind == "clip" else t5_xxl_shapes(t5_blocks, 4096 // divisor)
        tensors = {key: (torch.randn(shape, generator=generator) * 0.02).half() for key, shape in shapes.items()}
        if "fp8" in label:  # ComfyUI's scaled fp8: W ~ stored * scale_weight for the 2-D weights
            for key in [key for key, value in tensors.items() if value.ndim == 2 and key != "shared.weight"]:
                tensors[key] = (tensors[key].float() / 0.001).to(torch.float8_e4m3fn)
                tensors[key.removesuffix(".weight") + ".scale_weight"] = torch.tensor(0.001)
            tensors["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
        save_safetensors_atomic(tensors, path)
        del tensors
    return files


def measure(path: Path, kind: str, dtype: str) -> dict[str, float]:
    """Runs in a fresh interpreter (``--child``): peaks relative to the interpreter after its imports."""
    import accelerate  # noqa: F401 (imported before the baseline: a real run has them loaded already)
    from transformers import CLIPTextModel, T5EncoderModel  # noqa: F401 (transformers imports models lazily)

    from e2p_core.text_encoders import load_single_file

    base_rss, base_anon = status_mib("VmHWM"), status_mib("RssAnon")
    anon = AnonymousPeak()
    start = time.perf_counter()
    model = load_single_file(path, kind, getattr(torch, dtype), CLIP_L_SPECIAL_IDS)
    seconds = time.perf_counter() - start
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    model_mib = sum(storages.values()) / 2**20  # T5's tied embedding counted once
    return {"file_mib": path.stat().st_size / 2**20, "model_mib": model_mib, "seconds": seconds,
            "peak_rss_mib": status_mib("VmHWM") - base_rss, "peak_anon_mib": anon.stop() - base_anon}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/e2p_text_encoders"))
    parser.add_argument("--t5-blocks", type=int, default=2, help="T5 blocks to write (the real file has 24)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="compute dtype")
    parser.add_argument("--width-divisor", type=int, default=1, help="narrower models (a smoke run: 64)")
    parser.add_argument("--child", nargs=2, metavar=("FILE", "KIND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(Path(args.child[0]), args.child[1], args.dtype)))
        return
    print(f"torch {torch.__version__}, compute dtype {args.dtype}; peaks above the interpreter after its imports")
    print("| file | file MiB | model MiB | load s | peak RSS MiB | x file | peak anon MiB | x model |")
    print("|---|---|---|---|---|---|---|---|")
    for label, (path, kind) in write_files(args.workdir, args.t5_blocks, args.width_divisor).items():
        child = [sys.executable, __file__, "--dtype", args.dtype, "--child", str(path), kind]
        row = json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        print(f"| {label} | {row['file_mib']:.0f} | {row['model_mib']:.0f} | {row['seconds']:.2f} | "
              f"{row['peak_rss_mib']:.0f} | {row['peak_rss_mib'] / row['file_mib']:.2f} | "
              f"{row['peak_anon_mib']:.0f} | {row['peak_anon_mib'] / row['model_mib']:.2f} |")
    print(f"(the real t5xxl_fp16.safetensors: {REAL_T5_BLOCKS} blocks, {REAL_T5_BYTES / 2**30:.2f} GiB)")


if __name__ == "__main__":
    main()
