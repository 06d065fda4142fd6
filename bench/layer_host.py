"""Host time of one adapted layer's eager training call, per TinyLlama layer shape (fwd+bwd, dropout 0.05):
wall per call back to back, GPU time per call, and the host time to queue a call while the GPU is held by a
sleep kernel (so the host's cost is read without waiting on the GPU's); peft's layer and the patched layer on
the cuda backend. For A/B runs of host-side changes (bench/ab_run.sh); readings swing with the host's load.

python3 bench/layer_host.py"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e_profile as E  # noqa: E402

def host_issue_us(fn, calls=30):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    runs = []
    for _ in range(3):
        torch.cuda._sleep(int(2e9))  # ~1 s of GPU time: every call below only queues
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return min(runs)


for M, K, N in E.SHAPES:
    x = torch.randn(1, M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(1, M, N, device="cuda", dtype=torch.bfloat16)
    cells = []
    for name, backend in (("peft", None), ("patched cuda", "cuda")):
        model = E._peft_layer(K, N, backend)

        def step(model=model, x=x, dy=dy):
            model(x).backward(dy)
        wall, gpu, host = E._wall_us_per_call(step), E._gpu_us_per_call(step), host_issue_us(step)
        cells.append(f"{name} wall {wall:7.1f} / GPU {gpu:6.1f} / host {host:6.1f}")
    print(f"{M}x{K}->{N}: " + " | ".join(cells), flush=True)
