"""The one-GEMM kernel (csrc/cuda/lowrank_gemm.cu) against the cuBLAS pair, for A/B runs on a Hopper GPU: the
op alone (forward form x·Wᵀ and dx form dy·W) and the cuda backend's forward and train step (p = 0 and 0.05),
each as a ratio to cuBLAS in the same process (do_bench medians). Run once per setting, in separate
processes (the switch is read once):

    LORA_KERNELS_CUTLASS=1 python3 bench/one_gemm_ab.py; LORA_KERNELS_CUTLASS=0 python3 bench/one_gemm_ab.py

`--op-only` times the op alone against cuBLAS and skips the backend's forward and train step.
"""
import os
import sys

import torch
from triton.testing import do_bench

import lora_kernels as lk


def bench(fn):
    return do_bench(fn, warmup=25, rep=200) * 1e3  # µs


def main(r=16, op_only=False):
    assert lk.cuda_ext_available(), "needs the CUDA extension"
    tag = "cublas-pair" if os.environ.get("LORA_KERNELS_CUTLASS") == "0" else "one-gemm"
    has_op = hasattr(torch.ops.lora_kernels, "lowrank_gemm")
    print(f"{torch.cuda.get_device_name()}, {tag}, kernel built: {has_op}", flush=True)
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    for M, K, N in [(8192, 4096, 4096), (8192, 4096, 14336), (2048, 4096, 4096), (512, 4096, 4096),
                    (4096, 2048, 5632), (256, 4096, 4096), (64, 4096, 4096)]:
        x = torch.randn(M, K, device=dev, dtype=dt)
        w = (torch.randn(N, K, device=dev) / K**0.5).to(dt)
        a = (torch.randn(r, K, device=dev) / K**0.5).to(dt)
        b = (torch.randn(N, r, device=dev) / r**0.5).to(dt)
        with torch.no_grad():
            base = bench(lambda: x @ w.t())
            line = f"[{tag}] forward {M}x{K}x{N}: cuBLAS {base:.1f} us"
            if not op_only:
                fwd = bench(lambda: lk.lora_linear(x, w, a, b, 2.0, backend="cuda"))
                line += f", cuda backend {fwd:.1f} ({fwd / base:.3f}x)"
            if has_op:
                u, dy = x @ a.t(), torch.randn(M, N, device=dev, dtype=dt)
                g, at = dy @ b, a.t().contiguous()
                op = bench(lambda: torch.ops.lora_kernels.lowrank_gemm(x, w, u, b, None, 2.0, True))
                base_dx = bench(lambda: dy @ w)
                op_dx = bench(lambda: torch.ops.lora_kernels.lowrank_gemm(dy, w, g, at, None, 2.0, False))
                line += (f"; op alone {op:.1f} us ({op / base:.3f}x); dx form: cuBLAS dy@W {base_dx:.1f} us, op {op_dx:.1f}"
                         f" ({op_dx / base_dx:.3f}x)")
        print(line, flush=True)
    if op_only:
        return
    for M, K, N in [(8192, 4096, 4096), (4096, 2048, 5632), (2048, 4096, 4096)]:
        x = torch.randn(M, K, device=dev, dtype=dt, requires_grad=True)
        w = (torch.randn(N, K, device=dev) / K**0.5).to(dt)
        a = (torch.randn(r, K, device=dev) / K**0.5).to(dt).requires_grad_()
        b = (torch.randn(N, r, device=dev) / r**0.5).to(dt).requires_grad_()
        dy = torch.randn(M, N, device=dev, dtype=dt)
        base = bench(lambda: (x @ w.t()).backward(dy))
        for p in (0.0, 0.05):
            t = bench(lambda: lk.lora_linear(x, w, a, b, 2.0, dropout_p=p, backend="cuda").backward(dy))
            print(f"[{tag}] train {M}x{K}x{N} p={p}: cuBLAS fwd+dx {base:.1f} us, cuda backend {t:.1f}"
                  f" ({t / base:.3f}x)", flush=True)


if __name__ == "__main__":
    main(op_only="--op-only" in sys.argv[1:])
