"""Tile sweep of the two-launch split-K decode (partials, then reduce) under CUDA graphs: which partial tile,
pipeline depth and split, and which reduce tile, give the least GPU time per forward, against cuBLAS x@Wᵀ in
the same run; with --fused, the one-launch form's tiles instead (the path `auto` takes at 64 rows). Each
candidate's output is checked against float32 before it is timed.

    python3 bench/splitk_sweep.py [--rows 16 64] [--kn 4096] [--top 8] [--fused]"""
import argparse
import itertools

import torch
from triton.testing import do_bench_cudagraph

from lora_kernels.triton import configs, splitk

R = 16


def _partials(x, w, a, part, xa_part, k_per_split, split, bn, bk, warps, stages):
    M, K = x.shape
    N = w.shape[0]
    splitk._splitk_partial_kernel[(configs.cdiv(N, bn), split)](
        x, w, x, x, a, part, xa_part, M, N, K, R, k_per_split, x.stride(0), w.stride(0), w.stride(1),
        a.stride(0), a.stride(1), NF4=False, DOT_PRECISION="tf32", BLOCK_M=max(16, configs.next_pow2(M)),
        BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=16, num_warps=warps, num_stages=stages)


def _reduce(part, xa_part, b, y, xa, split, bn, warps):
    M, N = y.shape
    splitk._splitk_reduce_kernel[(configs.cdiv(N, bn),)](
        part, xa_part, b, y, y, y, xa, M, N, R, split, b.stride(0), b.stride(1), y.stride(0), 2.0,
        HAS_BIAS=False, SCALE_FROM_PTR=False, DOT_PRECISION="tf32", BLOCK_M=max(16, configs.next_pow2(M)),
        BLOCK_N=bn, BLOCK_R=16, num_warps=warps)


def _problem(M, KN, what):
    """Inputs of an M×KN forward (K = N = KN, bf16, rank R), its float32 result, outputs, and cuBLAS's time."""
    torch.manual_seed(0)
    dt = torch.bfloat16
    x = torch.randn(M, KN, device="cuda", dtype=dt)
    w = (torch.randn(KN, KN, device="cuda") / KN**0.5).to(dt)
    a = (torch.randn(R, KN, device="cuda") / KN**0.5).to(dt)
    b = (torch.randn(KN, R, device="cuda") / R**0.5).to(dt)
    ref = (x.float() @ w.float().t() + 2.0 * (x.float() @ a.float().t()) @ b.float().t())
    cublas = do_bench_cudagraph(lambda: x @ w.t(), rep=50)
    print(f"M={M} K=N={KN}: cuBLAS {cublas * 1e3:.1f} us ({what})", flush=True)
    y = torch.empty(M, KN, device="cuda", dtype=dt)
    xa = torch.empty(M, R, device="cuda", dtype=torch.float32)
    return x, w, a, b, ref, y, xa, cublas


def _checked(fwd, y, ref, label) -> str:
    """Runs fwd once: "ok", "failed" (it raised: a tile past the shared memory) or "wrong" (y off ref)."""
    try:
        fwd()
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - reported and skipped
        print(f"  {label}: {type(e).__name__}", flush=True)
        return "failed"
    err = (y.float() - ref).abs().max().item()
    if err > 0.1:
        print(f"  {label}: WRONG (max err {err:.3g})")
        return "wrong"
    return "ok"


def _fused(x, w, a, b, y, xa, split, bn, bk, warps, stages):
    M, K = x.shape
    N = w.shape[0]
    n_blocks = configs.cdiv(N, bn)
    k_per_split = configs.cdiv(configs.cdiv(K, split), bk) * bk
    split = configs.cdiv(K, k_per_split)
    part = torch.empty(split, M, N, device="cuda", dtype=torch.float32)
    xa_part = torch.empty(n_blocks * split, M, R, device="cuda", dtype=torch.float32)
    counts = torch.zeros(n_blocks, device="cuda", dtype=torch.int32)
    splitk._splitk_fused_kernel[(n_blocks, split)](
        x, w, a, part, xa_part, counts, b, y, y, y, xa, M, N, K, R, k_per_split, split, x.stride(0), w.stride(0),
        w.stride(1), a.stride(0), a.stride(1), b.stride(0), b.stride(1), y.stride(0), 2.0,
        HAS_BIAS=False, SCALE_FROM_PTR=False, DOT_PRECISION="tf32", BLOCK_M=max(16, configs.next_pow2(M)),
        BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=16, num_warps=warps, num_stages=stages)


def sweep_fused(M, KN, top):
    x, w, a, b, ref, y, xa, cublas = _problem(M, KN, "one-launch form")
    rows = []
    for bn, bk, warps, stages, split in itertools.product((32, 64, 128), (64, 128, 256), (4, 8), (3, 4),
                                                          (2, 3, 4, 6, 8)):
        def fwd():
            _fused(x, w, a, b, y, xa, split, bn, bk, warps, stages)
        if _checked(fwd, y, ref, f"bn={bn} bk={bk} w={warps} st={stages} split={split}") != "ok":
            continue
        rows.append((do_bench_cudagraph(fwd, rep=30), bn, bk, warps, stages, split))
    rows.sort()
    print(f"M={M}: best one-launch tiles, GPU us under graphs (ratio to cuBLAS); shipped: bn=64 bk=128 warps=4 "
          "stages=3")
    for t, bn, bk, warps, stages, split in rows[:top]:
        print(f"  {t * 1e3:5.1f} ({t / cublas:.3f})  bn={bn} bk={bk} warps={warps} stages={stages} split={split}")


def sweep(M, KN, top):
    x, w, a, b, ref, y, xa, cublas = _problem(M, KN, "two launches")
    K = N = KN
    rows = []
    for bn, bk, warps, stages in itertools.product((32, 64, 128), (64, 128, 256), (4, 8), (3, 4, 5)):
        if (warps == 8) != (bn == 128) or (bk == 256 and stages == 5):
            continue
        for split in (2, 3, 4, 6, 8, 12, 16):
            k_per_split = configs.cdiv(configs.cdiv(K, split), bk) * bk
            real = configs.cdiv(K, k_per_split)
            if real != split:
                continue
            part = torch.empty(split, M, N, device="cuda", dtype=torch.float32)
            xa_part = torch.empty(split, M, R, device="cuda", dtype=torch.float32)

            def fwd(rbn=64, rwarps=4):
                _partials(x, w, a, part, xa_part, k_per_split, split, bn, bk, warps, stages)
                _reduce(part, xa_part, b, y, xa, split, rbn, rwarps)
            status = _checked(fwd, y, ref, f"bn={bn} bk={bk} w={warps} st={stages} split={split}")
            if status == "failed":
                break  # the tile does not fit: no split of it will
            if status == "wrong":
                continue
            t_pair = do_bench_cudagraph(fwd, rep=30)
            t_part = do_bench_cudagraph(lambda: _partials(x, w, a, part, xa_part, k_per_split, split, bn, bk,
                                                          warps, stages), rep=30)
            rows.append((t_pair, t_part, bn, bk, warps, stages, split))
    rows.sort()
    print(f"M={M}: best partial + reduce(64 columns, 4 warps), GPU us under graphs (ratio to cuBLAS):")
    for t_pair, t_part, bn, bk, warps, stages, split in rows[:top]:
        print(f"  pair {t_pair * 1e3:5.1f} ({t_pair / cublas:.3f})  partials {t_part * 1e3:5.1f}  "
              f"bn={bn} bk={bk} warps={warps} stages={stages} split={split}")
    if not rows:
        return
    _, _, bn, bk, warps, stages, split = rows[0]
    k_per_split = configs.cdiv(configs.cdiv(K, split), bk) * bk
    part = torch.empty(split, M, N, device="cuda", dtype=torch.float32)
    xa_part = torch.empty(split, M, R, device="cuda", dtype=torch.float32)
    _partials(x, w, a, part, xa_part, k_per_split, split, bn, bk, warps, stages)
    print(f"M={M}: reduce tiles after the best partials, GPU us alone:")
    for rbn, rwarps in itertools.product((16, 32, 64, 128), (1, 2, 4, 8)):
        try:
            t = do_bench_cudagraph(lambda: _reduce(part, xa_part, b, y, xa, split, rbn, rwarps), rep=30)
        except Exception as e:  # noqa: BLE001
            print(f"  reduce bn={rbn} warps={rwarps}: {type(e).__name__}")
            continue
        err = (y.float() - ref).abs().max().item()
        print(f"  reduce bn={rbn} warps={rwarps}: {t * 1e3:.2f} us (max err {err:.3g})", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--kn", type=int, default=4096)
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--fused", action="store_true", help="sweep the one-launch form's tiles instead")
    args = ap.parse_args()
    for M in args.rows:
        (sweep_fused if args.fused else sweep)(M, args.kn, args.top)


if __name__ == "__main__":
    main()
