# Sourced by bench/run.sh and tests/run.sh: a Python with torch, triton and this package installed.
# Reuses a system torch where one is installed (GPU machines); otherwise makes .venv with torch 2.14.1.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
if python3 -c "import torch, triton" 2>/dev/null && [ "${LORA_KERNELS_VENV:-0}" != "1" ]; then
  PY=python3
else
  [ -x .venv/bin/python ] || python3 -m venv .venv
  PY=$ROOT/.venv/bin/python
  $PY -m pip install -q --upgrade pip setuptools wheel
  $PY -m pip install -q "torch==2.14.1" triton numpy ninja pybind11
fi
$PY -m pip install -q "$@"
# The CUDA extension builds where nvcc is found; CUDA_HOME must name the toolkit, not /usr/local.
if [ -z "${CUDA_HOME:-}" ]; then
  for d in /usr/local/cuda-13.0 /usr/local/cuda; do [ -x "$d/bin/nvcc" ] && export CUDA_HOME=$d && break; done
fi
# CUTLASS's headers (the nvidia-cutlass wheel, without its Python tooling's dependencies) for the Hopper one-GEMM
# kernel; setup.py leaves that kernel out where they are missing.
$PY -m pip install -q --no-deps "nvidia-cutlass==4.2.0"
$PY -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | grep -v "^\s*$" || true
$PY -c "import lora_kernels as lk; print('lora_kernels', lk.__version__, '| CUDA extension built:', lk.cuda_ext_available())"
