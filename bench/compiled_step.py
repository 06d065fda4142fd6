"""The e2e model's compiled training steps, for A/B runs of one change (bench/ab_run.sh): the patched
model's compiled step and peft's (the host's yardstick), median wall per step over 4 interleaved rounds of 5
steps after 3 warm-up steps, then the GPU kernel time and kernel count of one profiled step each.
Quicker than `python -m lora_kernels.bench --modes e2e` (no eager variants, no loss curves).

python3 bench/compiled_step.py [patched_compile peft_compile ...]"""
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from lora_kernels.bench import e2e
variants = sys.argv[1:] or ["patched_compile", "peft_compile"]
built = e2e.warmed(variants)
times = {n: [] for n in built}
for rnd in range(4):
    for n, (fwd, opt, data) in built.items():
        for i in range(5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            e2e._step(fwd, opt, data[i % 4])
            torch.cuda.synchronize()
            times[n].append((time.perf_counter() - t0) * 1e3)
for n, v in times.items():
    print(f"{n}: median {statistics.median(v):.2f} ms, min {min(v):.2f}, max {max(v):.2f} ({len(v)} steps)", flush=True)
for n, (fwd, opt, data) in built.items():
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        e2e._step(fwd, opt, data[0])
        torch.cuda.synchronize()
    ka = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    gpu_ms = sum(e.self_device_time_total for e in ka) / 1e3
    print(f"{n}: GPU kernel time {gpu_ms:.1f} ms, {sum(e.count for e in ka)} kernels", flush=True)
