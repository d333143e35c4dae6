#!/usr/bin/env bash
# AddressSanitizer + UBSan over the CPU kernels, driven by the Python tests (make sanitize).
#   bash scripts/sanitize.sh [pytest args...]     (default: SANITIZE_TESTS below)
# 1. builds libpretrain_kernels_ops.so (csrc/ops.cpp + csrc/cpu/*.cpp) with -DPK_SANITIZE=ON
#    through CMake into build/cmake-sanitize (scripts/cmake_build.sh; also runs the C++ tests,
#    sanitized);
# 2. runs the CPU tests with the ASan runtime preloaded into python and PK_OPS_LIBRARY naming
#    that library: tests/conftest.py loads it with torch.ops.load_library and stands in for the
#    extension pretrain_kernels._C, so every op call runs the sanitized kernels.
# ASan stops at the first error (heap/stack overflow, use after free, ...); UBSan
# (halt_on_error=1) at the first undefined behaviour; either fails the run with a report and
# a stack, printed on the terminal (--capture=sys: pytest's fd capture would swallow a report
# written just before the process exits). Leak detection is off: python keeps its objects to
# the end by design. Emulated and CUDA tests are deselected (they do not reach the sanitized
# kernels), and so is the test of the other instruction sets (it runs the extension in a
# child process).
# Knobs: PYTHON (default python), SANITIZE_BUILD (default build/cmake-sanitize), MAX_JOBS.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
BUILD=${SANITIZE_BUILD:-build/cmake-sanitize}
SANITIZE_TESTS=(tests/test_masking.py tests/test_sampling.py tests/test_diffusion.py tests/test_attention.py
                tests/test_properties.py -m "not emulated and not cuda"
                -k "not other_instruction_sets")

PYTHON=$PY bash scripts/cmake_build.sh "$BUILD" -DPK_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo
LIB="$PWD/$BUILD/libpretrain_kernels_ops.so"
[ -f "$LIB" ] || { echo "sanitize: $LIB was not built"; exit 1; }

CXX_BIN=${CXX:-g++}
ASAN_RT=$("$CXX_BIN" -print-file-name=libasan.so)
[ -f "$ASAN_RT" ] || { echo "sanitize: no libasan.so next to $CXX_BIN"; exit 1; }
# libstdc++ preloaded too: python does not link it, so without it ASan's __cxa_throw interceptor
# finds no real __cxa_throw at start-up and the first C++ exception (triton's import, a
# TORCH_CHECK) ends the process with "CHECK failed: ... real___cxa_throw".
STDCXX=$("$CXX_BIN" -print-file-name=libstdc++.so.6)

# run [VAR=value ...] -- [pytest args ...]
run() {
  local envs=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  env LD_PRELOAD="$ASAN_RT $STDCXX" PK_OPS_LIBRARY="$LIB" PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}" \
    ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:halt_on_error=1:print_summary=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}" \
    UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:print_summary=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}" \
    "${envs[@]}" "$PY" -m pytest -q -p no:cacheprovider --capture=sys "$@"
}

echo "sanitize: $LIB, ASan runtime $ASAN_RT"
if [ $# -gt 0 ]; then
  run -- "$@"
  exit
fi
run -- "${SANITIZE_TESTS[@]}"
# The CPU kernels have per-instruction-set paths picked at run time (csrc/cpu/cpu_isa.h); the
# run above took this CPU's best. The portable loops, the AVX-512 path without bf16
# instructions and the bf16 tiles without AMX once more, on the attention tests.
for isa in generic avx512 avx512bf16; do
  echo "sanitize: attention with the instruction set capped at $isa"
  run PK_CPU_ISA=$isa -- tests/test_attention.py tests/test_properties.py \
    -m "not emulated and not cuda" -k "not other_instruction_sets and (test_attention.py or flash_attention)"
done
