"""The benchmark scripts run end to end on CPU with the tiny fixture model and print complete tables."""

import subprocess
import sys
from pathlib import Path

from conftest import FIXTURES, TINY_DIT_CONFIG

REPO = Path(__file__).resolve().parent.parent


def table_rows(stdout: str) -> list[list[str]]:
    """The data rows of the markdown table in ``stdout``, as lists of stripped cells."""
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def run_script(*args: str) -> str:
    return subprocess.run([sys.executable, *args], cwd=REPO, check=True, capture_output=True, text=True).stdout


def test_gpu_inference_bench_runs_on_cpu_with_the_tiny_model():
    modes = ["full", "fp8", "offload", "gguf"]
    stdout = run_script("bench/gpu_inference.py", "--tiny", "--device", "cpu", "--repeats", "1", "--warmup", "0",
                        "--steps", "1", "--modes", *modes)
    rows = table_rows(stdout)
    assert rows[0][:4] == ["diffusers FluxKontextPipeline", "-", "64", "1"] and float(rows[0][4]) > 0
    by_mode = {(row[0], row[1]): row for row in rows[1:]}
    assert set(by_mode) == {(f"e2p {mode}", task) for mode in modes for task in ("depth", "matting")}
    for (what, _), row in by_mode.items():
        latency, dit, vae, diff = float(row[4]), float(row[5]), float(row[6]), float(row[9])
        assert min(latency, dit, vae) > 0  # the split comes from a separate run: no sum check on a shared CPU
        if what in ("e2p full", "e2p offload"):
            assert diff == 0  # same weights and numerics as the full path
        else:
            assert 0 < diff < 0.1  # fp8 / Q8_0 weights: close to, but not equal to, the full path


def test_cpu_stages_bench_splits_the_time():
    rows = table_rows(run_script("bench/cpu_stages.py", "--tasks", "depth", "normal", "--resolutions", "64",
                                 "--steps", "1", "2", "--repeats", "1"))
    assert [(row[0], row[1], row[2]) for row in rows] == [("depth", "64", "1"), ("depth", "64", "2"),
                                                          ("normal", "64", "1"), ("normal", "64", "2")]
    for row in rows:
        encode, dit, decode, other, total = map(float, row[3:])
        assert min(encode, dit, decode) > 0 and other >= 0
        assert abs(encode + dit + decode + other - total) < 0.2  # cells are rounded to 0.1 ms


def test_speed_options_stay_close_to_the_eager_path():
    """channels-last VAE and an explicit attention backend change kernels, not the maths (torch.compile is covered
    by the GPU benchmark's diff column: compiling takes minutes on this CPU)."""
    import numpy as np
    import torch

    from e2p_core.backends.diffusers_backend import load_diffusers_backend, speed_up
    from e2p_core.pipeline import perceive
    from e2p_core.prompts import PromptEmbeddings
    from e2p_core.weights import load_dit, load_vae

    dit = load_dit(FIXTURES / "dit_bfl.safetensors", TINY_DIT_CONFIG)
    vae = load_vae(FIXTURES / "vae_bfl.safetensors")
    arrays = np.load(FIXTURES / "inputs.npz")
    prompt = PromptEmbeddings(torch.from_numpy(arrays["depth_t5_emb"]), torch.from_numpy(arrays["depth_pooled_emb"]))
    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    for dtype, atol in ((torch.float32, 1e-4), (torch.bfloat16, 0.03)):
        outputs = []
        for fast in (False, True):
            denoiser, codec = load_diffusers_backend(dit, vae, dtype, "cpu")
            if fast:
                speed_up(denoiser, codec, attention_backend="native", channels_last_vae=True)
                assert codec.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
            outputs.append(perceive(denoiser, codec, image, "depth", prompt.to("cpu", dtype), resolution=64).output)
        assert (outputs[0] - outputs[1]).abs().max() <= atol


def test_host_memory_bench_measures_each_path_in_its_own_process(tmp_path):
    stdout = run_script("bench/host_memory.py", "--small", "--workdir", str(tmp_path), "--paths", "cli-lora",
                        "cli-gguf")
    rows = {row[0]: row for row in table_rows(stdout)}
    assert set(rows) == {"CLI, BFL file + LoRA, full", "CLI, BFL file + LoRA, memory mode gguf (Q8_0 on load)"}
    for row in rows.values():
        assert row[1] == "dit_384_1_1.safetensors" and all(float(cell) > 0 for cell in (*row[2:5], row[9]))
    # full mode adopts the file's mapped pages; the GGUF mode quantises from plain reads and keeps no mapping
    assert rows["CLI, BFL file + LoRA, full"][7] == "yes"
    assert rows["CLI, BFL file + LoRA, memory mode gguf (Q8_0 on load)"][7] == "no"
