#!/usr/bin/env bash
# One call on the GPU machine: build, GPU tests, benchmark. Usage: bash bench/gpu_run.sh [bench args...]
# Writes logs and results under $OUT (or ./.gpu_out).
set -uo pipefail
OUT=${OUT:-.gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
STEPS=${STEPS:-build,test,bench}
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } 2>&1 | tee "$OUT/env.log"
if [[ $STEPS == *build* ]]; then
  start=$(date +%s)
  LORA_KERNELS_ARCHS="90;90a" python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1; echo "build rc=$? in $(( $(date +%s) - start ))s"
  tail -5 "$OUT/build.log"
fi
if [[ $STEPS == *test* ]]; then
  python3 -m pytest -q -p no:cacheprovider tests ${TEST_ARGS:-} 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
fi
if [[ $STEPS == *bench* ]]; then
  python3 -m lora_kernels.bench --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" | grep -v "^bench:" | tail -60
fi
