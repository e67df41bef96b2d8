"""bench/gpu_check.sh: the GPU check's plumbing on the tiny model on CPU (--cpu-smoke), and its time budget."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_check(out_dir: Path, *args: str) -> tuple[str, str]:
    """(results file text, stdout) of one gpu_check.sh run; it must exit 0."""
    done = subprocess.run(["bash", "bench/gpu_check.sh", "--cpu-smoke", "--out-dir", str(out_dir), *args], cwd=REPO,
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    (results,) = out_dir.glob("RESULTS-cpu-smoke-*.md")
    return results.read_text(), done.stdout


def section(text: str, number: int) -> str:
    return text.split(f"\n## {number}.")[1].split("\n## ")[0]


def table_rows(text: str) -> list[list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| what")
             and not line.startswith("| check")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_cpu_smoke_writes_every_table(tmp_path):
    text, stdout = run_check(tmp_path)
    assert text.strip() in stdout.strip() or text.splitlines()[0] in stdout  # printed as it was written
    parity = table_rows(section(text, 1))
    assert parity and all(row[2] == "passed" for row in parity)
    assert {row[1] for row in parity} >= {"depth_1step_fp32-dit_bfl.safetensors",
                                          "depth_1step_bf16-dit_bfl.safetensors"}
    latency = table_rows(section(text, 2))
    assert [row[0] for row in latency].count("diffusers FluxKontextPipeline") == 2  # one per (px, steps)
    assert {(row[0], row[1], row[3]) for row in latency} >= {("e2p full", "depth", "1"), ("e2p full", "depth", "2")}
    modes = table_rows(section(text, 3))
    assert {row[0] for row in modes} == {"e2p fp8", "e2p offload"}
    assert all(row[9] for row in modes)  # the difference from the eager full path is filled
    assert "Skipped in the CPU smoke run" in section(text, 4) and "Total:" in text


def test_steps_that_run_out_of_time_still_leave_a_report(tmp_path):
    text, _ = run_check(tmp_path / "cut", "--step-limit-s", "2")  # less than any step's imports take
    for number in (1, 2, 3):
        assert "Timed out after 2 s: the rows above are what finished." in section(text, number)
    text, _ = run_check(tmp_path / "spent", "--budget-s", "1")
    for number in (1, 2, 3):
        assert "Skipped: the check's 1 s budget is spent." in section(text, number)
    assert "Total:" in text


def test_link_lists_a_results_file_once(tmp_path):
    results_md = REPO / "bench" / "RESULTS.md"
    original = results_md.read_text()
    try:
        for _ in range(2):
            subprocess.run(["bash", "bench/gpu_check.sh", "--link", "bench/RESULTS-nvidia-h100-2026-12-06.md"],
                           cwd=REPO, check=True)
        assert results_md.read_text().count("(RESULTS-nvidia-h100-2026-12-06.md)") == 1
    finally:
        results_md.write_text(original)
