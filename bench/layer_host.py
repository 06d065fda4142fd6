"""Host time of one adapted layer's eager training call, per TinyLlama layer shape (fwd+bwd, dropout 0.05):
wall per call back to back, GPU time per call, and the host time to queue a call while the GPU is held by a
sleep kernel (so the host's cost is read without waiting on the GPU's); peft's layer and the patched layer on
the cuda backend. For A/B runs of host-side changes (bench/ab_run.sh); readings swing with the host's load.

python3 bench/layer_host.py"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e_profile as E  # noqa: E402
from op_host import host_us  # noqa: E402 - the host time to queue a call behind a sleeping GPU

for M, K, N in E.SHAPES:
    x = torch.randn(1, M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(1, M, N, device="cuda", dtype=torch.bfloat16)
    cells = []
    for name, backend in (("peft", None), ("patched cuda", "cuda")):
        model = E._peft_layer(K, N, backend)

        def step(model=model, x=x, dy=dy):
            model(x).backward(dy)
        wall, gpu, host = E._wall_us_per_call(step), E._gpu_us_per_call(step), host_us(step)
        cells.append(f"{name} wall {wall:7.1f} / GPU {gpu:6.1f} / host {host:6.1f}")
    print(f"{M}x{K}->{N}: " + " | ".join(cells), flush=True)
