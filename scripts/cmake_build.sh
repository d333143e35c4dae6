#!/usr/bin/env bash
# Build the ops library and the C++ tests with CMake against the libtorch of the active
# python, then run ctest. Finds CUDA the way setup.py does (CUDA_HOME or /usr/local/cuda,
# plus the pip CUDA wheels for the libraries a bare toolkit lacks).
#   scripts/cmake_build.sh [build-dir] [extra cmake args...]   e.g. -DPK_WITH_CUDA=ON -DPK_SANITIZE=ON
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
BUILD=${1:-build/cmake-torch}
shift || true
args=(-DCMAKE_PREFIX_PATH="$($PY -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" -DCMAKE_BUILD_TYPE=Release)
if [ "$($PY -c 'import torch; print(torch.version.cuda is not None)')" = True ]; then
  cuda=${CUDA_HOME:-/usr/local/cuda}
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}   # no GPU probing at configure time
  args+=(-DCUDA_TOOLKIT_ROOT_DIR="$cuda" -DCMAKE_CUDA_COMPILER="$cuda/bin/nvcc")
  nvrtc=$($PY - <<'PYEOF'
import glob, os, site
for root in site.getsitepackages():
    for hit in sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib", "libnvrtc.so*"))):
        if "builtins" not in hit:
            print(hit); raise SystemExit
PYEOF
)
  [ -n "$nvrtc" ] && [ ! -e "$cuda/lib64/libnvrtc.so" ] && args+=(-DCUDA_nvrtc_LIBRARY="$nvrtc")
fi
cmake -S . -B "$BUILD" -G Ninja "${args[@]}" "$@"
cmake --build "$BUILD" -j "${MAX_JOBS:-2}"
ctest --test-dir "$BUILD" --output-on-failure
