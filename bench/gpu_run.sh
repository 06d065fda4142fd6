#!/usr/bin/env bash
# On a GPU machine, in steps: STEPS=build,test,sanitize,soak,cmake,bench,profile,e2eprof,dist,onegemm bash bench/gpu_run.sh [bench args...]
# On two GPUs, GPU1_STEPS=test (say) runs those steps on GPU 1 at the same time as STEPS on GPU 0.
# Logs and results go to $OUT (default .gpu_out; per-process logs packed in one .tgz per step); commit the bench results and summaries to bench/results/.
# The extension build and the CMake build run side by side (CPU); each later step has its own time limit.
set -uo pipefail
OUT=${OUT:-.gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
STEPS=${STEPS:-build,test,bench}
pids=()  # each step waits for its own processes by pid: a bare `wait` would also wait for GPU 1's steps
if [[ -n ${GPU1_STEPS:-} ]]; then
  # Two-GPU machines: GPU1_STEPS run on GPU 1 side by side with STEPS on GPU 0 (e.g. the tests next to the
  # benches); GPU 1's logs come back packed in gpu1.tgz, its summary at the end of this one's.
  ( export CUDA_VISIBLE_DEVICES=1; STEPS=$GPU1_STEPS GPU1_STEPS= OUT=$OUT/gpu1 bash "$0" "$@" > "$OUT/gpu1.log" 2>&1 ) &
  gpu1_pid=$!
  export CUDA_VISIBLE_DEVICES=0
fi
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
  cp lora_kernels/_C*.so "$OUT/" 2>/dev/null  # back to the caller: later calls carry it instead of rebuilding
fi
if [[ $STEPS == *test* ]]; then
  # TEST_SHARDS processes side by side (tests/conftest.py, LORA_KERNELS_TEST_SHARD): the GPU tests spend most
  # of their time compiling Triton kernels on the CPU, one shape after another.
  shards=${TEST_SHARDS:-4}
  case_timeout=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout=${TEST_CASE_TIMEOUT:-150}")
  for ((i = 0; i < shards; i++)); do
    # --timeout (pytest-timeout, where installed) names a test that hangs instead of losing the whole shard
    LORA_KERNELS_TEST_SHARD=$i/$shards timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider \
      -rfE --tb=short --durations=8 $case_timeout ${TEST_ARGS:-tests} > "$OUT/gpu_tests.shard$i.log" 2>&1 &
    pids+=($!)
  done
  wait "${pids[@]}"; pids=()
  for ((i = 0; i < shards; i++)); do
    echo "shard $i/$shards: $(tail -1 "$OUT/gpu_tests.shard$i.log")"; grep -E "^(FAILED|ERROR) " "$OUT/gpu_tests.shard$i.log"
  done | tee "$OUT/gpu_tests.log"
  tar czf "$OUT/gpu_tests_shards.tgz" -C "$OUT" $(cd "$OUT" && ls gpu_tests.shard*.log) && rm -f "$OUT"/gpu_tests.shard*.log
fi
if [[ $STEPS == *sanitize* ]]; then
  # Compile every kernel once outside the sanitizer (Triton's disk cache), so the sanitized runs only execute;
  # then every tool on every backend in its own process, side by side. Autotuning results go to the disk cache
  # too, and PyTorch's caching allocator is off: under the tools each process otherwise held ~55 GiB, and six
  # side by side ran the GPU out of memory.
  # LORA_KERNELS_QUICK_TUNE=1: one tile per kernel, no autotuning (on 16 cores the full warm-up did not end
  # in 80 s); each backend warms up in its own process.
  export TRITON_CACHE_AUTOTUNING=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1 LORA_KERNELS_QUICK_TUNE=1
  backends=$(python3 -c "import lora_kernels as lk; print('triton', 'cuda' if lk.cuda_ext_available() else '')")
  for backend in $backends; do
    timeout ${SANITIZE_WARMUP_TIMEOUT:-240} python3 bench/sanitize_cases.py $backend > "$OUT/sanitize_warmup_$backend.log" 2>&1 &
    pids+=($!)
  done
  wait "${pids[@]}"; pids=()
  for tool in memcheck racecheck synccheck; do
    for backend in $backends; do
      timeout ${SANITIZE_TIMEOUT:-300} compute-sanitizer --tool $tool --print-limit 20 \
        python3 bench/sanitize_cases.py $backend > "$OUT/sanitize_${tool}_$backend.log" 2>&1 &
      pids+=($!)
    done
  done
  wait "${pids[@]}"; pids=()
  for f in "$OUT"/sanitize_*_*.log; do
    echo "$(basename "$f" .log): $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|sanitize cases ran' "$f" | tr '\n' ' ')"
  done | tee "$OUT/sanitize_summary.log"
  tar czf "$OUT/sanitize_logs.tgz" -C "$OUT" $(cd "$OUT" && ls sanitize_*.log) && rm -f "$OUT"/sanitize_*_*.log
  unset PYTORCH_NO_CUDA_MEMORY_CACHING LORA_KERNELS_QUICK_TUNE TRITON_CACHE_AUTOTUNING  # later steps tune afresh
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
  # wall vs GPU time per call at every row of the kernels' target table (host-bound cells stand out)
  timeout ${PROFILE_TIMEOUT:-120} python3 bench/profile_cases.py --table "$OUT/host-table.md" 2>&1 | grep -v -i warn
fi
if [[ $STEPS == *e2eprof* ]]; then
  timeout ${E2EPROF_TIMEOUT:-300} python3 bench/e2e_profile.py --out "$OUT" ${E2EPROF_ARGS:-} 2>&1 | grep -v -i warn
fi
if [[ $STEPS == *dist* ]]; then
  # DDP and FSDP2 on DIST_NPROC GPUs (NCCL, NVLink multicast off): patched vs peft step time, and a check
  # against one process over the whole batch
  timeout ${DIST_TIMEOUT:-400} python3 -m lora_kernels.bench.distributed --nproc ${DIST_NPROC:-2} --out "$OUT" 2>&1 \
    | tee "$OUT/dist.log" | grep -v -i warn | tail -20
fi
if [[ $STEPS == *onegemm* ]]; then
  # The one-GEMM kernel (Hopper): its tests (every tile shape forced), the op alone with each shape forced and
  # with the timed pick, and the backend against the cuBLAS pair (LORA_KERNELS_CUTLASS=0), one process each
  # (the switches are read once per process); then the compiled e2e step with the kernel on and off.
  { timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_lowrank_gemm.py 2>&1 | tail -2
    for c in 0 1 2 3; do echo "-- op alone, LORA_KERNELS_CUTLASS_CONFIG=$c"
      LORA_KERNELS_CUTLASS_CONFIG=$c timeout 90 python3 bench/one_gemm_ab.py --op-only 2>&1 | grep -v -i warn; done
    echo "-- timed pick"; timeout 150 python3 bench/one_gemm_ab.py 2>&1 | grep -v -i warn
    # the main loop's tile order: the raster (CUTLASS's choice, along M, along N) and the swizzle
    for knob in RASTER=1 RASTER=2 SWIZZLE=2 SWIZZLE=4 SWIZZLE=8; do echo "-- op alone, timed pick, LORA_KERNELS_CUTLASS_$knob"
      env "LORA_KERNELS_CUTLASS_$knob" timeout 90 python3 bench/one_gemm_ab.py --op-only 2>&1 | grep -v -i warn; done
    echo "-- pair"; LORA_KERNELS_CUTLASS=0 timeout 150 python3 bench/one_gemm_ab.py 2>&1 | grep -v -i warn
    for on in 1 0; do echo "-- compiled step, LORA_KERNELS_CUTLASS=$on"
      LORA_KERNELS_CUTLASS=$on timeout 200 python3 bench/compiled_step.py patched_compile 2>&1 | grep -E "median|GPU kernel"
    done; } 2>&1 | tee "$OUT/onegemm.log"
fi
if [[ -n ${gpu1_pid:-} ]]; then
  wait $gpu1_pid; echo "== GPU 1 ($GPU1_STEPS):"; tail -40 "$OUT/gpu1.log"
  tar czf "$OUT/gpu1.tgz" -C "$OUT" gpu1 gpu1.log && rm -rf "$OUT/gpu1" "$OUT/gpu1.log"
fi
