"""Where the host time of one eager call goes, per backend: Python's profiler over back-to-back calls on the
GPU, the functions with the most own time and the most cumulative time, so that a host-bound row of the
target table (wall time per call far above GPU time) names its cause.

python3 bench/host_profile.py [--rows 16 2048] [--backends triton cuda auto] [--top 18]"""
import argparse
import cProfile
import io
import pstats

import torch

import lora_kernels as lk


def _case(M, K, N, r, backend, train, dt=torch.bfloat16):
    x = torch.randn(M, K, device="cuda", dtype=dt, requires_grad=train)
    w = torch.randn(N, K, device="cuda", dtype=dt) / K**0.5
    a = (torch.randn(r, K, device="cuda", dtype=dt) / K**0.5).requires_grad_(train)
    b = (torch.randn(N, r, device="cuda", dtype=dt) / r**0.5).requires_grad_(train)

    def step():
        y = lk.lora_linear(x, w, a, b, 2.0, backend=backend)
        if train:
            y.backward(torch.ones_like(y))
    return step


def profile_one(name, step, calls, top):
    for _ in range(5):
        step()
    torch.cuda.synchronize()
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
    args = ap.parse_args()
    for M in args.rows:
        for train in (False, True):
            for backend in args.backends:
                name = f"{'train' if train else 'forward'} {M}x4096x4096 r=16 {backend}"
                profile_one(name, _case(M, 4096, 4096, 16, backend, train), args.calls, args.top)


if __name__ == "__main__":
    main()
