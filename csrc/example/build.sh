#!/usr/bin/env bash
# Configure, build and run the CMake (libtorch) build and its C++ example. Usage: build.sh BUILD_DIR [PYTHON]
# Finds libtorch and CUDA from the given Python's torch; where the toolkit lacks libraries that torch's
# CMake config asks for (they ship in the nvidia pip wheels), points it at the wheel's copies.
set -euo pipefail
BUILD=${1:-build}; PY=${2:-python3}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PREFIX=$($PY -c 'import torch; print(torch.utils.cmake_prefix_path)')
args=(-DCMAKE_PREFIX_PATH="$PREFIX" -DCMAKE_BUILD_TYPE=Release)
CUDA_DIR=${CUDA_HOME:-}
[ -z "$CUDA_DIR" ] && for d in /usr/local/cuda-13.0 /usr/local/cuda; do [ -x "$d/bin/nvcc" ] && CUDA_DIR=$d && break; done
if [ -n "$CUDA_DIR" ]; then
  args+=(-DCUDA_TOOLKIT_ROOT_DIR="$CUDA_DIR" -DCMAKE_CUDA_COMPILER="$CUDA_DIR/bin/nvcc")
  NV=$($PY -c 'import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], "cu13"))' 2>/dev/null || true)
  if [ -n "$NV" ] && ! ls "$CUDA_DIR"/lib64/libnvrtc.so* >/dev/null 2>&1; then
    lib=$(ls "$NV"/lib/libnvrtc.so* | head -1); args+=(-DCUDA_nvrtc_LIBRARY="$lib" -DCUDA_NVRTC_LIB="$lib")
  fi
  # cuBLAS headers come from the wheel where the toolkit has none.
  if [ -n "$NV" ] && [ ! -f "$CUDA_DIR/include/cublas_v2.h" ]; then
    args+=(-DCMAKE_CUDA_FLAGS="-I$NV/include" -DCMAKE_CXX_FLAGS="-I$NV/include")
  fi
  # libtorch's CMake takes its GPU targets from this list (CMAKE_CUDA_ARCHITECTURES is ignored).
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0;9.0a"}
fi
cmake -S "$ROOT" -B "$BUILD" "${args[@]}" "${@:3}" > "$BUILD.configure.log" 2>&1 || { tail -30 "$BUILD.configure.log"; exit 1; }
cmake --build "$BUILD" -j "$(nproc)" > "$BUILD.build.log" 2>&1 || { grep -E "error" "$BUILD.build.log" | head -30; exit 1; }
"$BUILD/lora_kernels_example"
