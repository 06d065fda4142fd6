"""Host time per call of the op's Python layers, on tiny CPU tensors (the reference backend), so that the
kernels cost nothing: the eager fast path against the registered custom ops, and a plain x@Wᵀ for scale.

python3 bench/host_overhead.py  -> microseconds per forward and per forward+backward, median of 5 runs."""
import statistics
import time

import torch

import lora_kernels as lk
from lora_kernels import ops


def _us(fn, n=300):
    for _ in range(20):
        fn()
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(runs)


def main():
    torch.manual_seed(0)
    M, K, N, r = 4, 64, 64, 8
    x = torch.randn(M, K, requires_grad=True)
    w = torch.randn(N, K)
    a, b = torch.randn(r, K, requires_grad=True), torch.randn(N, r, requires_grad=True)
    dy = torch.randn(M, N)

    def step():
        lk.lora_linear(x, w, a, b, 2.0, backend="torch").backward(dy)

    def fwd():
        with torch.no_grad():
            lk.lora_linear(x, w, a, b, 2.0, backend="torch")

    rows = [("x@Wt fwd+bwd (torch, for scale)", _us(lambda: (x @ w.t()).backward(dy))),
            ("lora_linear fwd, eager path", _us(fwd)), ("lora_linear fwd+bwd, eager path", _us(step))]
    eager = ops._eager
    ops._eager = lambda *t: False
    try:
        rows += [("lora_linear fwd, custom ops", _us(fwd)), ("lora_linear fwd+bwd, custom ops", _us(step))]
    finally:
        ops._eager = eager
    print(f"torch {torch.__version__}, CPU tensors {M}x{K} -> {N}, r={r}")
    for name, us in rows:
        print(f"{name:40s} {us:8.1f} us")


if __name__ == "__main__":
    main()
