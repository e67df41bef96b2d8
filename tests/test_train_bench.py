"""``bench/train_bench.py --tiny`` runs the GPU benchmark's code path on the CPU and prints its table."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parent.parent


def test_train_bench_tiny_prints_a_row_per_configuration():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "bench/train_bench.py", "--tiny"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| lora") or line.startswith("| full")]
    assert len(rows) == 4  # lora/full x flow/flow+consistency
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert float(cells[6]) > 0  # seconds per step
    assert "| lora | 64 | 32x32 | 1 | flow+consistency |" in result.stdout
