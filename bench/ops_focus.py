"""A few rows of the ops bench, chosen on the command line, for A/B runs of one change (bench/ab_run.sh):
the same interleaved timing as `python -m lora_kernels.bench` (lora_kernels/bench/gpu.py), without its
other rows.

python3 bench/ops_focus.py                       -> the issue's large-M rows, every provider
python3 bench/ops_focus.py --rows train:8192x4096x4096:0.05 --providers base cuda
Each row: mode:MxKxN[:dropout]; output: per row, p50 ms and the ratio to cuBLAS x@Wᵀ (`base`) per provider,
with the p20-p80 spread."""
import argparse

import torch

from lora_kernels.bench import gpu

DEFAULT_ROWS = ["forward:8192x4096x4096", "forward:8192x4096x14336", "forward:2048x4096x4096",
                "train:8192x4096x4096", "train:8192x4096x4096:0.05", "train:2048x4096x4096"]


def parse_row(text):
    parts = text.split(":")
    M, K, N = (int(v) for v in parts[1].split("x"))
    return parts[0], M, K, N, float(parts[2]) if len(parts) > 2 else 0.0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="+", default=DEFAULT_ROWS)
    ap.add_argument("--providers", nargs="+", default=["base", "addmm", "triton", "cuda", "auto"])
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} git {gpu.git_sha()}")
    for text in args.rows:
        mode, M, K, N, p = parse_row(text)
        rows = gpu.bench_linear(mode, M, K, N, args.rank, torch.bfloat16, p, args.providers, print)
        base = next((r["p50_ms"] for r in rows if r["provider"] == "base"), None)
        cells = [f"{r['provider']} {r['p50_ms']:.4f} ms"
                 + (f" ({r['p50_ms'] / base:.3f}x, {r['p20_ms'] / base:.3f}-{r['p80_ms'] / base:.3f})" if base else "")
                 for r in rows]
        print(f"{text}: " + " | ".join(cells), flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
