#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU whose python3 already has torch, ninja,
# pybind11 and nvcc (no network needed): builds the extension, runs every CUDA test,
# compute-sanitizer (memcheck, racecheck) on small shapes, the GPU benchmarks, and prints
# a short table last. Logs and JSON go to $OUT (or build/device_check).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=${OUT:-build/device_check}
mkdir -p "$LOG"
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} PK_BUILD_CUDA=1
export PYTHONPATH="$PWD/python:$PWD/tests:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# Optional wheels for test-only packages missing on the machine (see README, "GPU check").
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/pk-site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/pk-site"
fi
summary=()

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee "$LOG/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

echo "== build (sm ${TORCH_CUDA_ARCH_LIST}, ${MAX_JOBS} jobs)"
t0=$(date +%s)
if ! $PY setup.py build_ext --inplace >"$LOG/build.log" 2>&1; then
  grep -n -i -E "error|warning" "$LOG/build.log" | head -40
  echo "BUILD FAILED"; exit 1
fi
summary+=("build: ok in $(( $(date +%s) - t0 ))s")
grep -E "registers|spill|stack frame" "$LOG/build.log" | head -0
$PY -c "import pretrain_kernels as pk; print(pk.build_info())"

echo "== CUDA tests"
t0=$(date +%s)
timeout 420 $PY -m pytest tests -m cuda -q -p no:cacheprovider -o addopts="" -rfE --junitxml="$LOG/cuda_tests.xml" 2>&1 | tee "$LOG/cuda_tests.log" | tail -40
summary+=("cuda tests: $(grep -E '^[0-9]+ (passed|failed)|^=+ .*(passed|failed).*' "$LOG/cuda_tests.log" | tail -1) ($(( $(date +%s) - t0 ))s)")

echo "== compute-sanitizer on small shapes"
if command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    if timeout 240 compute-sanitizer --tool $tool --error-exitcode 9 $PY scripts/sanitize_small.py >"$LOG/sanitize_$tool.log" 2>&1; then
      summary+=("compute-sanitizer $tool: clean")
    else
      summary+=("compute-sanitizer $tool: FAILED (see sanitize_$tool.log)"); tail -30 "$LOG/sanitize_$tool.log"
    fi
  done
else
  summary+=("compute-sanitizer: not found")
fi

echo "== GPU benchmarks"
t0=$(date +%s)
timeout 300 $PY -m pytest benchmarks -q -p no:cacheprovider -o addopts="" -k cuda --benchmark-json="$LOG/bench_gpu.json" \
  --benchmark-max-time=0.3 --benchmark-min-rounds=5 --benchmark-columns=median,ops >"$LOG/bench_gpu.log" 2>&1
summary+=("gpu benchmarks: $(tail -1 "$LOG/bench_gpu.log") ($(( $(date +%s) - t0 ))s)")
if [ -s "$LOG/bench_gpu.json" ]; then
  $PY benchmarks/report.py "$LOG/bench_gpu.json" --out "$LOG/report_gpu" --title "GPU benchmarks ($(head -1 "$LOG/gpu.txt" | cut -d, -f1))" >/dev/null
fi

echo
echo "================ device check summary ================"
printf '%s\n' "${summary[@]}"
[ -f "$LOG/report_gpu.md" ] && sed -n '/^| group/,$p' "$LOG/report_gpu.md"
