"""bench/feature_costs.py runs on CPU with the tiny model and counts what each feature costs."""

import subprocess
import sys
from pathlib import Path

from e2p_core.tiling import plan_tiles

REPO = Path(__file__).resolve().parent.parent


def test_feature_costs_count_dit_and_vae_calls():
    stdout = subprocess.run([sys.executable, "bench/feature_costs.py", "--frames", "4", "--size", "90x160",
                             "--tiles", "2"], cwd=REPO, check=True, capture_output=True, text=True).stdout
    rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")]
                                              for line in stdout.splitlines()[4:] if line.startswith("|"))}
    assert rows["depth + normal + matting, separate encodes"][:3] == ["3", "4", "3"]
    assert rows["depth + normal + matting, one shared encode"][:3] == ["3", "2", "3"]  # RGB once + matting's map
    assert rows["depth, tiles 2 (global + tiles)"][0] == str(1 + len(plan_tiles((90, 160), 2)))
    assert rows["video 4 frames, temporal alignment"][:3] == rows["video 4 frames, independent"][:3]
