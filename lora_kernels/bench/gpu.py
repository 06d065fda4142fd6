"""GPU benchmark: every provider timed in one process, each figure a ratio to cuBLAS x@Wᵀ of the same shape."""
from __future__ import annotations

import datetime
import gc
import platform
import subprocess

import torch
import triton
from triton.testing import do_bench

import lora_kernels as lk
from . import providers as P

MiB = 1 << 20
# (K, N) from Llama-3-8B (q/o 4096→4096, up 4096→14336, down 14336→4096, k/v 4096→1024).
FULL = dict(shapes=[(4096, 4096), (4096, 14336), (14336, 4096), (4096, 1024)], Ms=[1, 16, 128, 2048, 8192],
            ranks=[8, 16, 64])
QUICK = dict(shapes=[(4096, 4096), (4096, 14336), (14336, 4096)], Ms=[1, 16, 2048, 8192], ranks=[16])


def git_sha() -> str:
    """HEAD's short hash, with "+modified" when tracked files differ from it (a copied working tree whose
    git metadata is older than its files would otherwise stamp results with the wrong commit)."""
    try:
        sha = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                      stderr=subprocess.DEVNULL).strip()
        clean = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL).returncode == 0
        return sha if clean else sha + "+modified"
    except Exception:  # noqa: BLE001
        return "unknown"


def measure_ceilings():
    """Measured device-copy bandwidth (bytes read + written per s) and bf16 dense matmul rate."""
    a = torch.randint(0, 256, (1 << 28,), dtype=torch.uint8, device="cuda")   # 256 MiB of real data
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=10, rep=50, return_mode="median")
    bw = 2 * a.numel() / (ms * 1e-3)
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: x @ x, warmup=10, rep=50, return_mode="median")
    return bw, 2 * 8192**3 / (ms * 1e-3)


def floor_ms(mode, M, K, N, r, ceil):
    bw, fl = ceil
    if mode == "merge":
        return 2 * N * K * 2 / bw * 1e3
    flops = 2 * M * K * N + 2 * M * r * (K + N)
    byts = 2 * (M * K + N * K + M * N)
    if mode == "train":
        flops = 2 * flops + 2 * M * r * (K + N)
        byts = 2 * byts + 2 * M * N
    return max(flops / fl, byts / bw) * 1e3


def time_fn(fn, M, grads=None, graphs=True):
    """(p20, p50, p80) ms and how: CUDA-graph replay for M <= 64 (decode, as servers run it), else events.
    graphs=False: events at every M (training steps, whose code may sync with the host)."""
    q = [0.2, 0.5, 0.8]
    if M <= 64 and graphs:
        # Decode: launch overheads dominate eager timing; replay a CUDA graph as servers do.
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        try:
            return triton.testing.do_bench_cudagraph(fn, rep=100, quantiles=q), "cudagraph"
        except Exception:  # noqa: BLE001
            pass
    return do_bench(fn, warmup=25, rep=100, grad_to_none=grads, quantiles=q), "events"


def _step_fn(fwd, x, dy):
    def step():
        y = fwd(x)
        y.backward(dy)
    return step


def _activation_mib(fwd, x):
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    y = fwd(x)
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - before
    del y
    return kept / MiB


ROUNDS = 3  # interleaved rounds per row: every provider is timed once per round, the best round is kept


def _timer(mode, fwd, pb, name, M, N, dtype):
    """(timing call returning ((p20, p50, p80) ms, how), activation MiB or None) for one provider of a row;
    the first call (compilation, autotuning, measured choices) runs here, before any timing."""
    if mode == "forward":
        with torch.no_grad():
            fwd(pb.x)

        def run():
            with torch.no_grad():
                return time_fn(lambda: fwd(pb.x), M)
        return run, None
    x = pb.x.clone().requires_grad_()
    dy = torch.randn(M, N, device="cuda", dtype=dtype)
    step = _step_fn(fwd, x, dy)
    if name in P.FORCED_FEEDS:  # the backward's dx GEMM too
        step = P.forced("LORA_KERNELS_GEMM", P.FORCED_FEEDS[name], step)
    step()
    grads = [x, pb.lora_A, pb.lora_B]

    def run():
        return do_bench(step, warmup=10, rep=60, grad_to_none=grads, quantiles=[0.2, 0.5, 0.8]), "events"
    return run, _activation_mib(fwd, x)


def bench_linear(mode, M, K, N, r, dtype, dropout_p, names, log):
    """One row: every provider set up and warmed, then timed in ROUNDS interleaved rounds, so that a slow
    spell of the GPU's clock or of the host falls on all providers alike rather than on whichever ran last;
    each provider's round with the lowest median is kept."""
    pb = P.Problem(M, K, N, r, dtype, "cuda", dropout_p=dropout_p, adapter_dtype=dtype)
    timers = {}
    for name in names:
        fwd = P.build(name, pb)
        if fwd is None:
            continue
        try:
            timers[name] = _timer(mode, fwd, pb, name, M, N, dtype)
        except Exception as e:  # noqa: BLE001 - one provider failing must not lose the others' figures
            log(f"  {name}: failed: {type(e).__name__}: {str(e)[:200]}")
    best = {}
    for round_no in range(ROUNDS):
        # each round starts one provider later: under a sustained load the GPU's clock sags, and a fixed order
        # put the same provider last in every round (auto read 3-5 % above the cuda pick it runs on)
        order = list(timers.items())
        first = round_no % max(len(order), 1)
        for name, (run, peak) in order[first:] + order[:first]:
            try:
                (p20, p50, p80), how = run()
            except Exception as e:  # noqa: BLE001
                log(f"  {name}: failed: {type(e).__name__}: {str(e)[:200]}")
                timers.pop(name)
                best.pop(name, None)
                continue
            if name not in best or p50 < best[name]["p50_ms"]:
                best[name] = dict(provider=name, p20_ms=p20, p50_ms=p50, p80_ms=p80, act_mib=peak, timing=how)
    if "peft_compile" in names:
        torch._dynamo.reset()
    return [best[name] for name in timers if name in best]


def bench_merge(K, N, r, dtype, names, log):
    w = torch.randn(N, K, device="cuda", dtype=dtype)
    a = torch.randn(r, K, device="cuda") / K**0.5
    b = torch.randn(N, r, device="cuda") / r**0.5
    dst = torch.empty_like(w)

    def pair(backend):  # a merge and its unmerge, as a user switching adapters runs them; timed and halved
        return lambda: lk.unmerge_(lk.merge_(w, a, b, 2.0, backend=backend), a, b, 2.0, backend=backend)
    fns = {"copy": lambda: dst.copy_(w),
           "peft": lambda: w.add_(((b @ a) * 2.0).to(dtype)).sub_(((b @ a) * 2.0).to(dtype))}
    if "triton" in names and lk.triton_available():
        fns["triton"] = pair("triton")
    if "cuda" in names and lk.cuda_ext_available():
        fns["cuda"] = pair("cuda")
    rows = []
    for name, fn in fns.items():
        p20, p50, p80 = do_bench(fn, warmup=10, rep=50, quantiles=[0.2, 0.5, 0.8])
        half = 1.0 if name == "copy" else 0.5
        rows.append(dict(provider=name, p20_ms=p20 * half, p50_ms=p50 * half, p80_ms=p80 * half, act_mib=None,
                         timing="events"))
    return rows


def run(quick: bool, modes, names, dtype=torch.bfloat16, log=print, progress=None):
    cfg = QUICK if quick else FULL
    ceil = measure_ceilings()
    log(f"ceilings: copy {ceil[0] / 1e12:.2f} TB/s, bf16 matmul {ceil[1] / 1e12:.0f} TFLOP/s")
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                sha=git_sha(), time=datetime.datetime.now().isoformat(timespec="seconds"),
                host=platform.node(), copy_tbps=ceil[0] / 1e12, matmul_tflops=ceil[1] / 1e12)
    jobs = []
    for mode in modes:
        if mode == "merge":
            jobs += [("merge", 0, K, N, r, 0.0) for (K, N) in cfg["shapes"][:3] for r in cfg["ranks"]]
            continue
        for (K, N) in cfg["shapes"]:
            for M in cfg["Ms"]:
                if mode == "train" and M < 2048:
                    continue
                for r in cfg["ranks"]:
                    jobs.append((mode, M, K, N, r, 0.0))
                    if mode == "train" and (K, N) == (4096, 4096) and M == 8192:
                        jobs.append((mode, M, K, N, r, 0.05))
    results = []
    it = progress(jobs) if progress else jobs
    for mode, M, K, N, r, p in it:
        rows = bench_merge(K, N, r, dtype, names, log) if mode == "merge" else \
            bench_linear(mode, M, K, N, r, dtype, p, names, log)
        ref = next((x for x in rows if x["provider"] in ("base", "copy")), None)
        fl = floor_ms(mode, M, K, N, r, ceil)
        for row in rows:
            row.update(op="lora_linear" if mode != "merge" else "merge", mode=mode, M=M, K=K, N=N, r=r,
                       dtype=str(dtype).replace("torch.", ""), dropout=p, floor_ms=fl,
                       ratio=row["p50_ms"] / ref["p50_ms"] if ref else None, **meta)
            results.append(row)
        torch.cuda.empty_cache()
    return results, meta
