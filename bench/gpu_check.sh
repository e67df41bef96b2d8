#!/usr/bin/env bash
# The GPU check: one command for a short GPU slot (under 8 minutes on one H100, set-up included). In order, each
# step printing its table as soon as it is done and appending it to the results file at once, so a slot that ends
# early still leaves every finished table (and the finished rows of the step it was in):
#   1. GPU parity: every fixture run of tests/test_parity.py (Python API and CLI, both weight copies, float32 with
#      TF32 off at the CPU tolerance, and bf16) plus the context-encoding checks, on CUDA;
#   2. latency and peak VRAM at FLUX.1 Kontext size (random weights, model resident, warm): depth 768² and 1024² and
#      matting 768² at 1 step, depth 768² at 4 and 8 steps, each next to diffusers' FluxKontextPipeline at the same
#      resolution and steps (bench/gpu_inference.py);
#   3. the fp8 and offload memory modes, 1 step;
#   4. torch.compile (mode default) of the full path, depth 768², 1 step, with its difference from eager.
# Every step has its own time limit, cut to what is left of the whole budget (--budget-s, default 440 s) and to
# --step-limit-s if given.
#
#   bash bench/gpu_check.sh --out-dir "$OUT"     # on the GPU machine (see bench/README.md for the exact call)
#   bash bench/gpu_check.sh --cpu-smoke --out-dir /tmp/check   # the same plumbing on the tiny model, CPU (CI)
#   bash bench/gpu_check.sh --fetch-wheels       # here: what the GPU machine lacks, as wheels in .whl/
#   bash bench/gpu_check.sh --link bench/RESULTS-<device>-<date>.md   # list a results file in bench/RESULTS.md
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}
SMOKE=0
OUT_DIR=bench
BUDGET_S=""
STEP_LIMIT_S=""

link_results() {  # add "- [name](name)" under "## GPU checks" in bench/RESULTS.md, once
  local name
  name=$(basename "$1")
  grep -qF "($name)" bench/RESULTS.md && return 0
  grep -q "^## GPU checks" bench/RESULTS.md || printf '\n## GPU checks (bench/gpu_check.sh)\n\n' >>bench/RESULTS.md
  echo "- [$name]($name)" >>bench/RESULTS.md
}

fetch_wheels() {  # the packages the GPU image lacks, for CPython 3.12 on x86-64 (see bench/README.md)
  local diffusers_version
  diffusers_version=$("$PY" -c "import diffusers; print(diffusers.__version__)")
  mkdir -p .whl
  local exclude
  exclude=$(git rev-parse --git-path info/exclude)
  grep -qx "/.whl/" "$exclude" 2>/dev/null || echo "/.whl/" >>"$exclude"
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "diffusers==$diffusers_version" "importlib-metadata"
}

while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) SMOKE=1 ;;
    --out-dir) OUT_DIR=$2; shift ;;
    --budget-s) BUDGET_S=$2; shift ;;
    --step-limit-s) STEP_LIMIT_S=$2; shift ;;
    --link) link_results "$2"; exit 0 ;;
    --fetch-wheels) fetch_wheels; exit $? ;;
    *) echo "unknown argument $1 (see the top of $0)" >&2; exit 2 ;;
  esac
  shift
done

# The GPU budget keeps the whole check, set-up included, under 8 minutes; the CPU smoke run (CI) is small but a
# shared CPU can be slow, and its tables must be complete.
[ -n "$BUDGET_S" ] || BUDGET_S=$([ "$SMOKE" = 1 ] && echo 900 || echo 440)
START=$(date +%s)
DEADLINE=$((START + BUDGET_S))
export PYTHONUNBUFFERED=1

# Set-up: the carried wheels (the GPU machine reaches no package index), and the repository itself on the path.
if ! "$PY" -c "import diffusers" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/e2p-site \
      .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/e2p-site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "diffusers is missing and no .whl/ was carried: run 'bash bench/gpu_check.sh --fetch-wheels' here" >&2
    exit 1
  fi
fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}

if [ "$SMOKE" = 1 ]; then
  DEVICE=cpu
  DEVICE_NAME=cpu-smoke
  BENCH=(bench/gpu_inference.py --tiny --device cpu --repeats 1 --warmup 0)
  # A CI-sized share of the same runs: one float32 and one bf16 fixture run, two tiny configurations.
  PARITY_FILTER="python_api_matches_official_run and dit_bfl and (depth_1step_fp32- or depth_1step_bf16-)"
  LATENCY_CONFIGS=(depth:64:1 depth:64:2)
  MODE_CONFIGS=(depth:64:1)
  BUDGETS=(300 300 300 300)
  SHORT=()
else
  DEVICE=cuda
  DEVICE_NAME=$("$PY" -c "import torch; print(torch.cuda.get_device_name())" 2>/dev/null) || {
    echo "no CUDA device visible to $PY" >&2
    exit 1
  }
  BENCH=(bench/gpu_inference.py)
  PARITY_FILTER="official_run or context_encoding"
  LATENCY_CONFIGS=(depth:768:1 depth:1024:1 matting:768:1 depth:768:4 depth:768:8)
  MODE_CONFIGS=(depth:768:1 depth:1024:1 matting:768:1)
  BUDGETS=(90 150 110 120)
  SHORT=(--repeats 3 --warmup 1)  # steps 3 and 4: fewer timed runs (offload streams the weights every step)
fi
SLUG=$(echo "$DEVICE_NAME" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/^-//; s/-$//')
mkdir -p "$OUT_DIR"
RESULTS="$OUT_DIR/RESULTS-$SLUG-$(date -u +%Y-%m-%d).md"
LOGS=$(mktemp -d)

{
  echo "# GPU check: $DEVICE_NAME, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "\`bash bench/gpu_check.sh$([ "$SMOKE" = 1 ] && echo " --cpu-smoke")\` at commit" \
    "$(git rev-parse --short HEAD 2>/dev/null || echo unknown), budget ${BUDGET_S} s."
  "$PY" -c "import sys, torch, diffusers; print(f'Python {sys.version.split()[0]}, torch {torch.__version__}, '
            f'diffusers {diffusers.__version__}, CUDA {torch.version.cuda}')"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
} | tee "$RESULTS"

step() {  # step TITLE LIMIT_S COMMAND: run it under its limit (cut to what is left), tee its table to the results
  local title=$1 limit=$2 command=$3
  local left=$((DEADLINE - $(date +%s)))
  printf '\n## %s\n\n' "$title" | tee -a "$RESULTS"
  if [ "$left" -lt 10 ]; then
    echo "Skipped: the check's ${BUDGET_S} s budget is spent." | tee -a "$RESULTS"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  [ -n "$STEP_LIMIT_S" ] && [ "$limit" -gt "$STEP_LIMIT_S" ] && limit=$STEP_LIMIT_S
  local log="$LOGS/$(echo "$title" | tr -cs 'A-Za-z0-9' '_').log"
  local begin=$(date +%s)
  timeout --kill-after=10 "$limit" bash -c "$command" 2>"$log" | tee -a "$RESULTS"
  local status=${PIPESTATUS[0]}
  local took=$(($(date +%s) - begin))
  if [ "$status" = 124 ] || [ "$status" = 137 ]; then
    echo "Timed out after ${limit} s: the rows above are what finished." | tee -a "$RESULTS"
  elif [ "$status" != 0 ]; then
    { echo "Failed (exit $status); the end of its log:"; echo; echo '```'; tail -n 15 "$log"; echo '```'; } |
      tee -a "$RESULTS"
  fi
  printf '\n(%d s)\n' "$took" | tee -a "$RESULTS"
}

step "1. Parity with the official fixtures on $DEVICE (float32 with TF32 off, bf16; the CPU tolerances)" \
  "${BUDGETS[0]}" \
  "E2P_PARITY_DEVICE=$DEVICE '$PY' -m pytest -v --tb=no -rf -p no:cacheprovider tests/test_parity.py \
     -k '$PARITY_FILTER' | '$PY' bench/parity_table.py"
step "2. Latency and peak memory, full bf16, next to diffusers' FluxKontextPipeline" "${BUDGETS[1]}" \
  "'$PY' ${BENCH[*]} --modes full --configs ${LATENCY_CONFIGS[*]}"
step "3. Memory modes: fp8 and offload" "${BUDGETS[2]}" \
  "'$PY' ${BENCH[*]} ${SHORT[*]} --no-baseline --diff-against-full --modes fp8 offload \
     --configs ${MODE_CONFIGS[*]}"
if [ "$SMOKE" = 1 ]; then
  printf '\n## 4. torch.compile\n\nSkipped in the CPU smoke run (compiling takes minutes on a CPU).\n' |
    tee -a "$RESULTS"
else
  step "4. torch.compile (mode default), full bf16, depth 768² 1 step (the warm-up compiles)" "${BUDGETS[3]}" \
    "'$PY' ${BENCH[*]} ${SHORT[*]} --no-baseline --modes full --compile default --configs depth:768:1"
fi

printf '\nTotal: %d s.\n' $(($(date +%s) - START)) | tee -a "$RESULTS"
rm -rf "$LOGS"
echo "wrote $RESULTS" >&2
