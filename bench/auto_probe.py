"""Whether `auto` runs what the backend it picks runs: train steps (forward + backward) of backend "cuda" and
"auto" on the same tensors, 3 alternating do_bench rounds each, then the kernels of 5 profiled steps per
provider, and auto's resolved picks. (The ops bench read auto 1-12 % above cuda on train rows.)

python3 bench/auto_probe.py"""
import warnings

import torch
from triton.testing import do_bench
import lora_kernels as lk
from lora_kernels.bench import providers as P
warnings.simplefilter("always")
shapes = [(2048, 4096, 14336, 0.0), (8192, 4096, 4096, 0.0), (8192, 4096, 4096, 0.05), (2048, 4096, 4096, 0.0)]
for M, K, N, p in shapes:
    pb = P.Problem(M, K, N, 16, torch.bfloat16, "cuda", dropout_p=p, adapter_dtype=torch.bfloat16)
    x = pb.x.clone().requires_grad_()
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    fns = {}
    for name in ("cuda", "auto"):
        fwd = P.build(name, pb)
        def step(fwd=fwd):
            fwd(x).backward(dy)
        step()
        fns[name] = step
    grads = [x, pb.lora_A, pb.lora_B]
    res = {n: [] for n in fns}
    for _ in range(3):
        for n, f in fns.items():
            res[n].append(do_bench(f, warmup=10, rep=60, grad_to_none=grads, return_mode="median"))
    cells = [f"{n} {min(v):.4f} ms (rounds {', '.join(f'{t:.4f}' for t in v)})" for n, v in res.items()]
    print(f"== train {M}x{K}x{N} p={p}: " + "  ".join(cells), flush=True)
    for n, f in fns.items():
        for g in grads:
            g.grad = None
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                f()
                for g in grads:
                    g.grad = None
            torch.cuda.synchronize()
        ev = [e for e in prof.key_averages() if e.device_time_total > 0]
        ev.sort(key=lambda e: -e.device_time_total)
        top = [f"{e.key[:60]} {e.device_time_total / 5:.1f}us x{e.count // 5}" for e in ev[:10]]
        print(f"   {n}: " + "; ".join(top), flush=True)
print("resolved:", {k[-6:]: v for k, v in lk.ops._RESOLVED.items()})
