#!/usr/bin/env bash
# On a GPU machine, in steps: STEPS=build,test,sanitize,soak,cmake,bench,profile,e2eprof bash bench/gpu_run.sh [bench args...]
# Logs and results go to $OUT (default .gpu_out); commit the bench results and summaries to bench/results/.
# The extension build and the CMake build run side by side (CPU); each later step has its own time limit.
set -uo pipefail
OUT=${OUT:-.gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
STEPS=${STEPS:-build,test,bench}
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } 2>&1 | tee "$OUT/env.log"
if [[ $STEPS == *cmake* ]]; then
  ( TORCH_CUDA_ARCH_LIST="9.0a" timeout ${CMAKE_TIMEOUT:-400} bash csrc/example/build.sh /tmp/cmake-build python3 \
      > "$OUT/cmake.log" 2>&1; echo "cmake example rc=$?" >> "$OUT/cmake.log" ) &
  cmake_pid=$!
fi
if [[ $STEPS == *build* ]]; then
  start=$(date +%s)
  LORA_KERNELS_ARCHS="90;90a" python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1
  echo "build rc=$? in $(( $(date +%s) - start ))s"; tail -1 "$OUT/build.log"
fi
if [[ $STEPS == *test* ]]; then
  timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider ${TEST_ARGS:-tests} 2>&1 \
    | tee "$OUT/gpu_tests.log" | tail -15
fi
if [[ $STEPS == *sanitize* ]]; then
  # Compile every kernel once outside the sanitizer (Triton's disk cache), so the sanitized runs only execute.
  timeout 120 python3 bench/sanitize_cases.py > "$OUT/sanitize_warmup.log" 2>&1
  for tool in memcheck racecheck synccheck; do
    timeout ${SANITIZE_TIMEOUT:-120} compute-sanitizer --tool $tool --print-limit 20 python3 bench/sanitize_cases.py \
      > "$OUT/sanitize_$tool.log" 2>&1
    echo "sanitizer $tool rc=$?: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitize_$tool.log" | tail -1)"
  done
fi
if [[ $STEPS == *soak* ]]; then
  timeout ${SOAK_TIMEOUT:-120} python3 bench/soak.py --steps ${SOAK_STEPS:-10000} --cycles ${SOAK_CYCLES:-10000} \
    --out "$OUT/soak.json" 2>&1 | tail -30
fi
if [[ $STEPS == *cmake* ]]; then
  wait $cmake_pid; tail -12 "$OUT/cmake.log"
fi
if [[ $STEPS == *bench* ]]; then
  timeout ${BENCH_TIMEOUT:-420} python3 -m lora_kernels.bench --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" \
    | grep -v "^bench:" | tail -90
fi
if [[ $STEPS == *profile* ]]; then
  timeout ${PROFILE_TIMEOUT:-120} python3 bench/profile_cases.py 2>&1 | grep -v -i warn | tee "$OUT/profile.log"
fi
if [[ $STEPS == *e2eprof* ]]; then
  timeout ${E2EPROF_TIMEOUT:-300} python3 bench/e2e_profile.py --out "$OUT" ${E2EPROF_ARGS:-} 2>&1 | grep -v -i warn
fi
