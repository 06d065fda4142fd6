#!/usr/bin/env bash
# On a GPU machine, in steps: STEPS=build,test,sanitize,soak,cmake,bench bash bench/gpu_run.sh [bench args...]
# Logs and results go to $OUT (default .gpu_out); commit the bench results and summaries to bench/results/.
set -uo pipefail
OUT=${OUT:-.gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
STEPS=${STEPS:-build,test,bench}
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } 2>&1 | tee "$OUT/env.log"
if [[ $STEPS == *build* ]]; then
  start=$(date +%s)
  LORA_KERNELS_ARCHS="90;90a" python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1
  echo "build rc=$? in $(( $(date +%s) - start ))s"; tail -3 "$OUT/build.log"
fi
if [[ $STEPS == *test* ]]; then
  python3 -m pytest -q -p no:cacheprovider tests ${TEST_ARGS:-} 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
fi
if [[ $STEPS == *sanitize* ]]; then
  for tool in memcheck racecheck initcheck; do
    compute-sanitizer --tool $tool --print-limit 20 python3 bench/sanitize_cases.py > "$OUT/sanitize_$tool.log" 2>&1
    echo "sanitizer $tool rc=$?: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitize_$tool.log" | tail -1)"
  done
fi
if [[ $STEPS == *soak* ]]; then
  python3 bench/soak.py --steps ${SOAK_STEPS:-10000} --cycles ${SOAK_CYCLES:-10000} --out "$OUT/soak.json" | tail -30
fi
if [[ $STEPS == *cmake* ]]; then
  TORCH_CUDA_ARCH_LIST="9.0a" bash csrc/example/build.sh "$OUT/cmake-build" python3 2>&1 | tail -12
  rm -rf "$OUT/cmake-build"
fi
if [[ $STEPS == *bench* ]]; then
  python3 -m lora_kernels.bench --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" | grep -v "^bench:" | tail -70
fi
