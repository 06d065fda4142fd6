"""Per-kernel GPU time of a few representative calls (torch.profiler), to see where a slow case spends it,
and the wall time per call when calls are issued back to back: wall well above GPU time means the host
(Python, dispatch, launches) is the limit, not the kernels.

python3 bench/profile_cases.py  -> per case: GPU and wall microseconds per call, then the top kernels.
python3 bench/profile_cases.py --table out.md  -> wall / GPU microseconds per call for every row of the
    kernels' target table (forward and train step, cuBLAS, the addmm composite, triton, cuda and auto)."""
import argparse
import time

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import lora_kernels as lk
from lora_kernels import nf4
from lora_kernels.auto_linear import addmm_linear

DEVICE = "cuda"  # a module constant so that a CPU dry run of the script's logic can swap it


def _warm(fn):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()


def _wall_us(fn, reps=100):
    """Wall µs per call issued back to back. Every case's wall time is taken before the profiler first
    runs: its CUDA activity hooks may stay installed and slow later launches (a one-row x@Wᵀ read 42 µs
    per call in a run that timed each case after profiling it)."""
    _warm(fn)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e6


def _gpu_us(fn, reps=20):
    """GPU µs per call (the profiler's kernel times), and its CUDA events."""
    _warm(fn)
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0 and e.device_type.name == "CUDA"]
    return sum(e.device_time_total for e in events) / reps, events


def _run_cases(cases, reps=20):
    """cases: [(name, fn)]; wall times for all first, then one profile per case (top kernels printed)."""
    walls = {}
    for name, fn in cases:
        walls[name] = _guard(name, lambda fn=fn: _wall_us(fn))
    for name, fn in cases:
        if walls[name] is None:
            continue
        gpu_us, events = _gpu_us(fn, reps)
        print(f"== {name}: GPU {gpu_us:.1f} us, wall {walls[name]:.1f} us per call")
        for e in sorted(events, key=lambda e: -e.device_time_total)[:12]:
            print(f"   {e.device_time_total / reps:9.1f} us  x{e.count // reps:<3d} {e.key[:90]}")


def _no_grad(fn):
    def run():
        with torch.no_grad():
            return fn()
    return run


# The rows of the fused op's target table (bf16, r = 16): work, M, K, N, dropout.
TABLE = [("forward", 8192, 4096, 4096, 0.0), ("forward", 8192, 4096, 14336, 0.0), ("forward", 2048, 4096, 4096, 0.0),
         ("forward", 512, 4096, 4096, 0.0), ("forward", 4096, 2048, 5632, 0.0), ("forward", 16, 4096, 4096, 0.0),
         ("forward", 64, 4096, 4096, 0.0), ("train", 8192, 4096, 4096, 0.0), ("train", 8192, 4096, 4096, 0.05),
         ("train", 4096, 2048, 5632, 0.0), ("train", 2048, 4096, 4096, 0.0), ("train", 4096, 2048, 256, 0.0)]


def host_table(path, r=16, dt=torch.bfloat16):
    """Wall vs GPU time per call, issued back to back, for each row and provider: a cell whose wall time is
    well above its GPU time is bound by the host. All wall times are taken before any profiling."""
    names = ["cublas", "addmm", "triton", "cuda", "auto"]
    rows = []
    for work, M, K, N, p in TABLE:
        torch.manual_seed(0)
        w = (torch.randn(N, K, device=DEVICE) / K**0.5).to(dt)
        a = (torch.randn(r, K, device=DEVICE) / K**0.5).to(dt).requires_grad_()
        b = (torch.randn(N, r, device=DEVICE) / r**0.5).to(dt).requires_grad_()
        x = torch.randn(M, K, device=DEVICE, dtype=dt, requires_grad=work == "train")
        dy = torch.randn(M, N, device=DEVICE, dtype=dt)

        def addmm(x=x, w=w, a=a, b=b, p=p):
            xd = nn.functional.dropout(x, p) if p > 0 else x
            return (x @ w.t()).addmm_(xd @ a.t(), b.t(), alpha=2.0)
        fwds = {"cublas": lambda x=x, w=w: x @ w.t(), "addmm": addmm}
        for be in ("triton", "cuda", "auto"):
            fwds[be] = lambda be=be, x=x, w=w, a=a, b=b, p=p: lk.lora_linear(x, w, a, b, 2.0, dropout_p=p, backend=be)
        runs = {n: (lambda fn=fwds[n], dy=dy: fn().backward(dy)) if work == "train" else _no_grad(fwds[n])
                for n in names}
        rows.append((f"| {work} | {M}×{K}×{N} | {p} | ", runs))
    walls = [{n: _guard(n, lambda fn=fn: _wall_us(fn)) for n, fn in runs.items()} for _, runs in rows]
    lines = ["| work | M×K×N | p | " + " | ".join(f"{n} wall / GPU µs" for n in names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for (head, runs), wall in zip(rows, walls):
        cells = []
        for n in names:
            gpu = _guard(n, lambda fn=runs[n]: _gpu_us(fn)[0]) if wall[n] is not None else None
            cells.append("failed" if gpu is None else f"{wall[n]:.0f} / {gpu:.0f}")
        lines.append(head + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _guard(name, fn):
    """fn()'s result, or None after printing why it failed (one case failing must not lose the others)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        print(f"== {name}: failed: {type(e).__name__}: {str(e)[:200]}")
        return None


def main(only=(), r=16):
    torch.manual_seed(0)
    K = N = 4096
    dev, dt = DEVICE, torch.bfloat16
    w = (torch.randn(N, K, device=dev) / K**0.5).to(dt)
    a = (torch.randn(r, K, device=dev) / K**0.5).to(dt).requires_grad_()
    b = (torch.randn(N, r, device=dev) / r**0.5).to(dt).requires_grad_()
    cases = []
    for M in (1, 4, 8, 16, 64, 2048, 8192):
        x = torch.randn(M, K, device=dev, dtype=dt)
        cases.append((f"cublas x@Wt M={M}", _no_grad(lambda x=x: x @ w.t())))
        for be in ("triton", "cuda"):
            cases.append((f"{be} forward M={M}",
                          _no_grad(lambda x=x, be=be: lk.lora_linear(x, w, a, b, 2.0, backend=be))))
    for M in (2048, 8192):
        x = torch.randn(M, K, device=dev, dtype=dt, requires_grad=True)
        dy = torch.randn(M, N, device=dev, dtype=dt)
        cases.append((f"cublas train M={M}", lambda x=x, dy=dy: (x @ w.t()).backward(dy)))
        for be, p in (("triton", 0.0), ("triton", 0.05), ("cuda", 0.0), ("cuda", 0.05)):
            cases.append((f"{be} train M={M} p={p}", lambda x=x, dy=dy, be=be, p=p:
                          lk.lora_linear(x, w, a, b, 2.0, dropout_p=p, backend=be).backward(dy)))
        for p in (0.0, 0.05):  # auto's third candidate: cuBLAS products around the mask kernels
            cases.append((f"composite train M={M} p={p}", lambda x=x, dy=dy, p=p:
                          addmm_linear(x, w, a, b, None, 2.0, p).backward(dy)))
    for n_rows in (4096, 14336):  # merge + unmerge of one layer (issue target: ~1.1x a copy of W)
        wm = (torch.randn(n_rows, K, device=dev) / K**0.5).to(dt)
        am, bm = torch.randn(r, K, device=dev, dtype=dt), torch.randn(n_rows, r, device=dev, dtype=dt)
        cases.append((f"copy W {n_rows}x{K}", lambda wm=wm: wm.clone()))
        for be in ("triton", "cuda"):
            cases.append((f"{be} merge+unmerge {n_rows}x{K}", lambda wm=wm, am=am, bm=bm, be=be: lk.unmerge_(
                lk.merge_(wm, am, bm, 0.5, backend=be), am, bm, 0.5, backend=be)))
    layer = nf4.FusedLoRALinear4bit.from_linear(nn.Linear(K, N, bias=False, device=dev, dtype=dt), r=r,
                                                lora_alpha=2 * r, backend="triton")
    for M in (1, 4, 16, 8192):
        x = torch.randn(M, K, device=dev, dtype=dt)
        cases.append((f"nf4 triton M={M}", _no_grad(lambda x=x: layer(x))))
        if M <= nf4.EXTENSION_DECODE_MAX_ROWS and lk.cuda_ext_available():
            cases.append((f"nf4 cuda M={M}", _no_grad(lambda x=x: nf4.lora4_linear(
                x, layer.qweight, layer.lora_A, layer.lora_B, layer.scaling, backend="cuda"))))
    bank = lk.LoRAAdapterBank(K, N, max_adapters=64, max_rank=r, bias=False, device=dev, dtype=dt)
    for s in range(64):
        bank.load_adapter(f"a{s}", torch.randn(r, K, device=dev) / K**0.5, torch.randn(N, r, device=dev),
                          lora_alpha=2 * r)
    for M, S in ((64, 64), (8192, 16)):
        x = torch.randn(M, K, device=dev, dtype=dt)
        ids = (torch.arange(M, device=dev) % S).to(torch.int32)
        cases.append((f"multi M={M} adapters={S}", _no_grad(lambda x=x, ids=ids: lk.multi_lora_linear(
            x, bank.weight, bank.lora_A, bank.lora_B, bank.scalings, ids, backend="triton", check_ids=False))))
    x, ids = torch.randn(64, K, device=dev, dtype=dt, requires_grad=True), torch.arange(64, device=dev).int()
    A, B = bank.lora_A.detach().requires_grad_(), bank.lora_B.detach().requires_grad_()
    dy = torch.randn(64, N, device=dev, dtype=dt)
    cases.append(("multi train M=64 adapters=64", lambda: lk.multi_lora_linear(
        x, bank.weight, A, B, bank.scalings, ids, backend="triton", check_ids=False).backward(dy)))
    _run_cases([c for c in cases if not only or any(o in c[0] for o in only)])
    _print_choices()


def _print_choices():
    """What the runs above chose: each Triton GEMM variant's tile (autotuned once per key) and each measured
    path (split-K / GEMM / multiply-add decode, TMA / pointer feed, ...)."""
    from lora_kernels.triton import fused_linear, measured
    print("== tiles chosen by the autotuner (device, M bucket, N, K, R, dtypes, flags):")
    for key, cfg in fused_linear._tuned_configs.items():
        print(f"   {key}: {cfg}")
    print("== measured choices:")
    for key, pick in measured._chosen.items():
        print(f"   {key}: {pick}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--table", help="write the wall / GPU table of every target row to this markdown file")
    ap.add_argument("--only", nargs="+", default=(), help="profile only the cases whose names contain one of these")
    ap.add_argument("--rank", type=int, default=16, help="the adapters' rank (profiled cases; the table keeps 16)")
    args = ap.parse_args()
    host_table(args.table) if args.table else main(args.only, args.rank)
