"""Shared memory per GEMM tile: the pruning's estimate (configs.gemm_smem_bytes) against the figure Triton's
compiler reports for sm_90a, over every tile in GEMM_CONFIGS and the kernel variants that change it. No GPU
needed. python3 bench/smem_check.py  -> one line per case; exits 1 if any estimate is below Triton's figure."""
import os
import sys

import triton
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(__file__))
import aot_check as ac  # noqa: E402

from lora_kernels.triton import configs  # noqa: E402


def cases():
    for c in configs.GEMM_CONFIGS:
        for dtype, elem in (("bf16", 2), ("fp32", 4)):
            for fold, nf4, block_r in ((False, False, 16), (True, False, 64), (False, True, 16), (False, False, 64)):
                if (fold and c.kwargs["BLOCK_M"] > 64) or (nf4 and dtype == "fp32"):
                    continue  # x·Aᵀ is folded in only for small M; NF4 runs with 16-bit activations
                # adapters in the activations' dtype, and float32 adapters under bf16 (peft's default)
                for lowrank in ((elem, 4) if dtype == "bf16" else (elem,)):
                    yield c, dtype, elem, fold, nf4, block_r, lowrank


def main():
    under = 0
    for c, dtype, elem, fold, nf4, block_r, lowrank in cases():
        kw = dict(c.kwargs)
        fn, ptrs, consts = ac._gemm(dtype, FOLD_XA=fold, NF4=nf4, BLOCK_R=block_r,
                                    DOT_PRECISION="tf32" if dtype == "fp32" else "ieee", **kw)
        ptrs = dict(ptrs, r_ptr="*fp32" if lowrank == 4 else ptrs["*"])
        est = configs.gemm_smem_bytes(kw, c.num_stages, elem, block_r, fold, nf4, lowrank)
        consts, attrs = ac._specialise(fn, consts)
        src = ASTSource(fn=fn, signature=ac._signature(fn, ptrs, consts), constexprs=consts, attrs=attrs)
        real = triton.compile(src, target=ac.TARGET,
                              options=dict(num_warps=c.num_warps, num_stages=c.num_stages)).metadata.shared
        under += est < real
        print(f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} stages={c.num_stages} {dtype} fold={fold} nf4={nf4} "
              f"R={block_r} adapters={'fp32' if lowrank == 4 else dtype}: estimate {est}, triton {real} {'ok' if est >= real else 'UNDER'}", flush=True)
    print(f"triton {triton.__version__}: {under} estimates below Triton's figure")
    return 1 if under else 0


if __name__ == "__main__":
    sys.exit(main())
