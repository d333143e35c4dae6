#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU whose python3 already has torch, ninja,
# pybind11 and nvcc (no network needed): builds the extension, runs every CUDA test, the GPU
# benchmarks (pk-bench --device cuda; needs pytest-benchmark), compute-sanitizer (memcheck,
# racecheck) on small shapes, and prints a short table last. Logs and JSON go to $OUT (or
# build/device_check).
# The whole run keeps to PK_CHECK_BUDGET seconds (default 540, under a 10-minute call): each
# stage's timeout is cut to what is left after the stages that follow have their share, and
# the summary is appended to $OUT/summary.txt as each stage ends, so a run cut short still
# reports what it did.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=${OUT:-build/device_check}
mkdir -p "$LOG"
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} PK_BUILD_CUDA=1
export PYTHONPATH="$PWD/python:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# Optional wheels for test-only packages missing on the machine (see README, "GPU check").
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/pk-site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/pk-site"
fi
summary=()
BUDGET=${PK_CHECK_BUDGET:-540}
T_START=$(date +%s)
# seconds for a stage: at most $1, leaving $2 for the stages after it (never under 20)
stage_limit() {
  local left=$(( BUDGET - ($(date +%s) - T_START) - $2 ))
  local t=$(( left < $1 ? left : $1 ))
  echo $(( t < 20 ? 20 : t ))
}
note() { summary+=("$1"); printf '%s\n' "$1" >> "$LOG/summary.txt"; }
: > "$LOG/summary.txt"

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee "$LOG/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

echo "== build (sm ${TORCH_CUDA_ARCH_LIST}, ${MAX_JOBS} jobs)"
t0=$(date +%s)
if ! $PY setup.py build_ext --inplace >"$LOG/build.log" 2>&1; then
  grep -n -i -E "error|warning" "$LOG/build.log" | head -40
  echo "BUILD FAILED"; exit 1
fi
note "build: ok in $(( $(date +%s) - t0 ))s"
$PY -c "import pretrain_kernels as pk; print(pk.build_info())"

echo "== CUDA tests"
t0=$(date +%s)
lim=$(stage_limit 260 200)
timeout $lim $PY -m pytest tests -m cuda -q -p no:cacheprovider -o addopts="" -rfE --durations=15 \
  --junitxml="$LOG/cuda_tests.xml" 2>&1 | tee "$LOG/cuda_tests.log" | tail -60
note "cuda tests: $(grep -E '^[0-9]+ (passed|failed)|^=+ .*(passed|failed).*' "$LOG/cuda_tests.log" | tail -1) ($(( $(date +%s) - t0 ))s of ${lim}s)"

echo "== GPU benchmarks (pk-bench)"
t0=$(date +%s)
lim=$(stage_limit 150 100)
# every family's CUDA cases; table, plot, machine description and JSON in $LOG/bench_gpu/
timeout $lim $PY -m pretrain_kernels.bench --device cuda --out "$LOG/bench_gpu" \
  -- --benchmark-max-time=0.3 --benchmark-min-rounds=5 >"$LOG/bench_gpu.log" 2>&1
note "gpu benchmarks: $(grep -E '^=* ?[0-9]+ (passed|failed|error)' "$LOG/bench_gpu.log" | tail -1) ($(( $(date +%s) - t0 ))s of ${lim}s)"
while IFS= read -r line; do note "gpu benchmarks, $line"; done < <(grep -E '^(skipped:|pk-bench needs)' "$LOG/bench_gpu.log")

echo "== compute-sanitizer on small shapes"
if command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    lim=$(stage_limit 60 $([ $tool = memcheck ] && echo 45 || echo 5))
    if timeout $lim compute-sanitizer --tool $tool --error-exitcode 9 $PY scripts/sanitize_small.py >"$LOG/sanitize_$tool.log" 2>&1; then
      note "compute-sanitizer $tool: clean"
    else
      note "compute-sanitizer $tool: FAILED or cut at ${lim}s (see sanitize_$tool.log)"; tail -30 "$LOG/sanitize_$tool.log"
    fi
  done
else
  note "compute-sanitizer: not found"
fi

echo
echo "================ device check summary ================"
printf '%s\n' "${summary[@]}"
[ -f "$LOG/bench_gpu/report.md" ] && sed -n '/^| group/,$p' "$LOG/bench_gpu/report.md"
