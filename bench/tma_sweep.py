"""GPU time of the TMA-fed low-rank GEMM per tile and variant, against cuBLAS x@Wᵀ of the same shape in the same
process, to choose the defaults of lora_kernels/triton/tma_gemm.py by measurement.

python3 bench/tma_sweep.py [--out sweep.md] [--shapes 8192x4096x4096 ...]   (needs a Hopper GPU)

Each row: the skinny pass that writes x·Aᵀ (dy·B for dx), then the GEMM with one entry of tma_gemm.CONFIGS (tile,
stages, tile loop flattened or not), as the Triton path runs it. Both directions run: the forward (B = Wᵀ) and dx
(B = W). Every output is compared with the first entry's, so a fast wrong kernel cannot win; times are the median
of CUDA-graph replays. (Results of earlier variants, since removed: bench/NOTES.md.)"""
import argparse
import itertools

import torch

from lora_kernels.triton import fused_linear as fl
from lora_kernels.triton import tma_gemm
from merge_tiles_sweep import _graph_us

SHAPES = ["8192x4096x4096", "8192x4096x14336", "8192x14336x4096", "2048x4096x4096"]


def _case(M, K, N, r, dx, layout="view", adapter_dtype=torch.float32):
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.bfloat16
    if dx:  # dx = dy·W + s·(dy·B)·A: the GEMM's K is the layer's N
        a = torch.randn(M, N, device="cuda", dtype=h, generator=g)
        b = torch.randn(N, K, device="cuda", dtype=h, generator=g) / N**0.5
        fl_op = torch.randn(N, r, device="cuda", generator=g) / r**0.5   # lora_B (N×r)
        low_r = torch.randn(r, K, device="cuda", generator=g) / K**0.5   # lora_A (r×K)
        out = torch.empty(M, K, device="cuda", dtype=h)
        base = lambda: a @ b  # noqa: E731
    else:
        a = torch.randn(M, K, device="cuda", dtype=h, generator=g)
        w = torch.randn(N, K, device="cuda", dtype=h, generator=g) / K**0.5
        b = w.t()
        fl_op = (torch.randn(r, K, device="cuda", generator=g) / K**0.5).t()  # lora_A.t() (K×r)
        low_r = (torch.randn(N, r, device="cuda", generator=g) / r**0.5).t()  # lora_B.t() (r×N)
        if layout == "contiguous":  # Bᵀ stored (r×N) row-major instead of a view of B (N×r)
            low_r = low_r.contiguous()
        out = torch.empty(M, N, device="cuda", dtype=h)
        base = lambda: a @ w.t()  # noqa: E731
    low_l = torch.empty(M, r, device="cuda", dtype=torch.float32)
    fl_op, low_r = fl_op.to(adapter_dtype), low_r.to(adapter_dtype)
    return a, b, fl_op, low_r, out, low_l, base


def _run(a, b, fl_op, low_r, out, low_l):
    def run():
        low_l.copy_(fl.skinny_rank(a, fl_op))
        tma_gemm.launch(a, b, out, low_l, low_r, None, 0.5, a, False, fl.Dropout(None, 0.0), "tf32", 16)
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--shapes", nargs="*", default=SHAPES)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--layout", default="view", choices=["view", "contiguous"],
                    help="the low-rank step's right factor: a view of the adapter as stored, or copied row-major")
    ap.add_argument("--adapter-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--directions", nargs="+", default=["fwd", "dx"], choices=["fwd", "dx"])
    ap.add_argument("--tiles", nargs="*", default=None, help="only the CONFIGS entries whose tag contains one")
    args = ap.parse_args()
    lines = [f"GPU {torch.cuda.get_device_name()} · torch {torch.__version__} · rank {args.rank} · bf16 x and W, "
             f"{args.adapter_dtype} adapters, low-rank factor as a {args.layout} · µs per call (CUDA-graph "
             "replays) and ratio to cuBLAS; `skinny µs`: the x·Aᵀ (dy·B) pass alone", "",
             "| dir | M×K×N | cuBLAS µs | skinny µs | tile | µs | ratio | max diff / max |out| vs the first |",
             "|---|---|---|---|---|---|---|---|"]
    all_cfgs = list(tma_gemm.CONFIGS)
    dirs = [d == "dx" for d in args.directions]
    for shape, dx in itertools.product(args.shapes, dirs):
        M, K, N = (int(v) for v in shape.split("x"))
        a, b, fl_op, low_r, out, low_l, base = _case(M, K, N, args.rank, dx, args.layout,
                                                     getattr(torch, args.adapter_dtype))
        base_us = _graph_us(base)
        skinny_us = _graph_us(lambda: low_l.copy_(fl.skinny_rank(a, fl_op)))
        first = None
        for cfg in all_cfgs:
            tag = "{BLOCK_M}x{BLOCK_N}x{BLOCK_K}".format(**cfg.kwargs) + f" w{cfg.num_warps} s{cfg.num_stages}" + \
                (" flattened" if cfg.kwargs["FLATTEN"] else "")
            if args.tiles and not any(t in tag for t in args.tiles):
                continue
            tma_gemm.CONFIGS[:] = [cfg]
            tma_gemm._best.clear()
            try:
                run = _run(a, b, fl_op, low_r, out, low_l)
                out.fill_(float("nan"))
                run()
                torch.cuda.synchronize()
                got = out.clone()
                same = "ref" if first is None else \
                    f"{((got.float() - first.float()).abs().max() / first.float().abs().max()).item():.1e}"
                if first is None:
                    first = got
                us = _graph_us(run)
                row = f"| {'dx' if dx else 'fwd'} | {M}×{K}×{N} | {base_us:.1f} | {skinny_us:.1f} | {tag} | " \
                      f"{us:.1f} | {us / base_us:.3f} | {same} |"
            except Exception as e:  # noqa: BLE001 - a tile that does not compile or fit is reported, not fatal
                row = f"| {'dx' if dx else 'fwd'} | {M}×{K}×{N} | {base_us:.1f} | {skinny_us:.1f} | {tag} | failed: " \
                      f"{type(e).__name__}: {str(e)[:80]} | | |"
            print(row, flush=True)
            lines.append(row)
        tma_gemm.CONFIGS[:] = all_cfgs
    text = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
