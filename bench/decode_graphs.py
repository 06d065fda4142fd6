"""GPU time under CUDA graphs (do_bench_cudagraph, best of 3 interleaved rounds) of the 8-64-row forward:
cuBLAS x@Wᵀ, lk.lora_linear on the Triton backend with each decode path forced (LORA_KERNELS_DECODE), and auto;
with each path's largest error against float64 first.

    python3 bench/decode_graphs.py [gemm,splitk,fused]     (KN=14336 for a wider W)"""
import os
import sys

import torch
from triton.testing import do_bench_cudagraph

import lora_kernels as lk
torch.manual_seed(0)
K = N = int(os.environ.get("KN", 4096))
r, dt = 16, torch.bfloat16
paths = sys.argv[1].split(",") if len(sys.argv) > 1 else ["gemm", "splitk", "fused"]
W = (torch.randn(N, K, device="cuda") / K**0.5).to(dt)
A = (torch.randn(r, K, device="cuda") / K**0.5).to(dt)
B = (torch.randn(N, r, device="cuda") / r**0.5).to(dt)


def forced(path):
    """LORA_KERNELS_DECODE set to path (None: unset, auto's own measured pick)."""
    os.environ.pop("LORA_KERNELS_DECODE", None)
    if path is not None:
        os.environ["LORA_KERNELS_DECODE"] = path


for M in (8, 16, 32, 64):
    x = torch.randn(M, K, device="cuda", dtype=dt)
    ref = x.double() @ W.double().t() + 2.0 * (x.double() @ A.double().t()) @ B.double().t()
    runs = {"cublas": (None, lambda: x @ W.t())}
    for p in paths:
        runs[f"triton:{p}"] = (p, lambda: lk.lora_linear(x, W, A, B, 2.0, backend="triton"))
    runs["auto"] = (None, lambda: lk.lora_linear(x, W, A, B, 2.0))
    best = {}
    with torch.no_grad():
        for name, (path, fn) in runs.items():
            forced(path)
            y = fn()
            if name != "cublas":
                print(f"M={M} {name}: max err {(y.double() - ref).abs().max().item():.3g}")
        for _ in range(3):
            for name, (path, fn) in runs.items():
                forced(path)  # read while the graph is captured, so the forced path is what replays
                t = do_bench_cudagraph(fn, rep=100, quantiles=[0.5])
                best[name] = min(best.get(name, float("inf")), t[0] if isinstance(t, (list, tuple)) else t)
    forced(None)
    base = best["cublas"]
    print(f"M={M} {K}x{N} graphs: " + "  ".join(f"{n} {t * 1e3:.1f}us ({t / base:.3f})" for n, t in best.items()),
          flush=True)
