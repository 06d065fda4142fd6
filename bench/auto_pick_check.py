"""Does `auto` pick the backend that the bench then measures faster? For each row: the times auto's own
timing decided on (measured.timings), then each backend timed three ways in the same process: auto's
cold_ms (per call, L2 overwritten before each), gpu_ms (kernels only, back to back) and do_bench as the
bench runs it (L2 flushed before every call, each call between its own events).

python3 bench/auto_pick_check.py [--out file.md]"""
import argparse

import torch
from triton.testing import do_bench

import lora_kernels as lk
from lora_kernels import auto_linear
from lora_kernels.triton import measured

ROWS = [("forward", 2048, 4096, 4096), ("forward", 8192, 4096, 4096), ("forward", 8192, 4096, 14336),
        ("forward", 8192, 14336, 4096), ("train", 2048, 4096, 4096), ("train", 8192, 4096, 4096),
        ("train", 8192, 4096, 14336), ("train", 8192, 14336, 4096)]


def _row(work, M, K, N, r=16, dt=torch.bfloat16):
    torch.manual_seed(0)
    w = (torch.randn(N, K, device="cuda") / K**0.5).to(dt)
    a = (torch.randn(r, K, device="cuda") / K**0.5).to(dt).requires_grad_()
    b = (torch.randn(N, r, device="cuda") / r**0.5).to(dt).requires_grad_()
    x = torch.randn(M, K, device="cuda", dtype=dt, requires_grad=work == "train")
    dy = torch.randn(M, N, device="cuda", dtype=dt)

    def call(be):
        if work == "train":
            def step():
                lk.lora_linear(x, w, a, b, 2.0, backend=be).backward(dy)
            return step

        def fwd():
            with torch.no_grad():
                lk.lora_linear(x, w, a, b, 2.0, backend=be)
        return fwd
    call("auto")()  # auto's own timing runs here
    key = auto_linear._key(x, w, a, b, None, 0.0, work == "train")
    cells = [f"{measured._chosen.get(key)} ({measured.timings(key)})"]
    for be in ("cuda", "triton"):
        fn = call(be)
        cold = min(measured.cold_ms(fn) for _ in range(3))
        gpu = min(measured.gpu_ms(fn) for _ in range(3))
        bench = min(do_bench(fn, warmup=10, rep=60, grad_to_none=[x, a, b], return_mode="median") for _ in range(3))
        cells.append(f"{cold:.3f} / {gpu:.3f} / {bench:.3f}")
    return f"| {work} | {M}×{K}×{N} | " + " | ".join(cells) + " |"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    args = ap.parse_args()
    lines = ["| work | M×K×N | auto's pick (its timings) | cuda cold / gpu / do_bench ms | "
             "triton cold / gpu / do_bench ms |", "|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for row in ROWS:
        lines.append(_row(*row))
        print(lines[-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
