"""Where the host time of one eager call goes, per backend: Python's profiler over back-to-back calls on the
GPU, the functions with the most own time and the most cumulative time, so that a host-bound row of the
target table (wall time per call far above GPU time) names its cause.

python3 bench/host_profile.py [--rows 16 2048] [--backends triton cuda auto] [--top 18] [--shape K N]
    [--dropout p] [--train-only] [--adapter-dtype float32]
Each case also prints its wall time per call without the profiler and, for calls whose GPU work outlasts their
host time, their GPU time (measured.gpu_ms: not meaningful for host-bound calls, see bench/NOTES.md)."""
import argparse
import cProfile
import io
import pstats
import time

import torch

import lora_kernels as lk


def _case(M, K, N, r, backend, train, dt=torch.bfloat16, p=0.0, adapter_dt=None):
    adapter_dt = adapter_dt or dt
    x = torch.randn(M, K, device="cuda", dtype=dt, requires_grad=train)
    w = torch.randn(N, K, device="cuda", dtype=dt) / K**0.5
    a = (torch.randn(r, K, device="cuda", dtype=adapter_dt) / K**0.5).requires_grad_(train)
    b = (torch.randn(N, r, device="cuda", dtype=adapter_dt) / r**0.5).requires_grad_(train)

    def step():
        y = lk.lora_linear(x, w, a, b, 2.0, backend=backend, dropout_p=p)
        if train:
            y.backward(torch.ones_like(y))
    return step


def _wall_and_gpu_us(step, calls):
    """Wall µs per call back to back, and µs per call with the stream held while the calls are queued."""
    from lora_kernels.triton import measured
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / calls * 1e6
    return wall, measured.gpu_ms(step, reps=min(calls, 20)) * 1e3


def profile_one(name, step, calls, top):
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    wall, gpu = _wall_and_gpu_us(step, calls)
    print(f"== {name}: wall {wall:.0f} us per call without the profiler, GPU {gpu:.0f} us per call")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        step()
    torch.cuda.synchronize()
    prof.disable()
    for key in ("tottime", "cumulative"):
        buf = io.StringIO()
        stats = pstats.Stats(prof, stream=buf).strip_dirs().sort_stats(key)
        stats.print_stats(top)
        total = stats.total_tt / calls * 1e6
        body = buf.getvalue()
        body = body[body.find("ncalls"):]
        print(f"== {name}: {total:.0f} us of profiled host time per call, by {key} (ncalls over {calls} calls)")
        print(body.rstrip())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[16, 2048])
    ap.add_argument("--backends", nargs="+", default=["triton", "cuda", "auto"])
    ap.add_argument("--top", type=int, default=18)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--shape", type=int, nargs=2, default=[4096, 4096], metavar=("K", "N"))
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--train-only", action="store_true")
    ap.add_argument("--adapter-dtype", default=None, choices=[None, "float32", "bfloat16"])
    args = ap.parse_args()
    K, N = args.shape
    adapter_dt = getattr(torch, args.adapter_dtype) if args.adapter_dtype else None
    for M in args.rows:
        for train in ((True,) if args.train_only else (False, True)):
            for backend in args.backends:
                name = f"{'train' if train else 'forward'} {M}x{K}x{N} r=16 p={args.dropout} {backend}"
                profile_one(name, _case(M, K, N, 16, backend, train, p=args.dropout, adapter_dt=adapter_dt),
                            args.calls, args.top)


if __name__ == "__main__":
    main()
