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
            for fold, nf4, block_r in ((False, False, 16), (True, False, 64), (False, 0, 16), (False, 1, 16),
                                       (False, 2, 16), (False, False, 64)):
                # nf4: False, or the NF4 layout (0: per-element gather; 1 / 2: whole rows, B = Wᵀ / W)
                if (fold and c.kwargs["BLOCK_M"] > 64) or (nf4 is not False and dtype == "fp32"):
                    continue  # x·Aᵀ is folded in only for small M; NF4 runs with 16-bit activations
                # adapters in the activations' dtype, and float32 adapters under bf16 (peft's default)
                for lowrank in ((elem, 4) if dtype == "bf16" else (elem,)):
                    yield c, dtype, elem, fold, nf4, block_r, lowrank


def main():
    under = 0
    for c, dtype, elem, fold, nf4, block_r, lowrank in cases():
        kw = dict(c.kwargs)
        is_nf4 = nf4 is not False
        fn, ptrs, consts = ac._gemm(dtype, FOLD_XA=fold, NF4=is_nf4, NF4_LAYOUT=nf4 if is_nf4 else 0,
                                    BLOCK_R=block_r, DOT_PRECISION="tf32" if dtype == "fp32" else "ieee", **kw)
        ptrs = dict(ptrs, r_ptr="*fp32" if lowrank == 4 else ptrs["*"])
        # the stages the pruning would launch (configs.fit_stages), or the config's own where none fit
        fit = configs.fit_stages([c], elem, block_r, fold, is_nf4, lowrank, is_nf4 and nf4 != 0)
        stages = fit[0].num_stages if fit else c.num_stages
        est = configs.gemm_smem_bytes(kw, stages, elem, block_r, fold, is_nf4, lowrank, is_nf4 and nf4 != 0)
        consts, attrs = ac._specialise(fn, consts)
        src = ASTSource(fn=fn, signature=ac._signature(fn, ptrs, consts), constexprs=consts, attrs=attrs)
        real = triton.compile(src, target=ac.TARGET,
                              options=dict(num_warps=c.num_warps, num_stages=stages)).metadata.shared
        under += est < real
        print(f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} stages={stages} {dtype} fold={fold} nf4={nf4} "
              f"R={block_r} adapters={'fp32' if lowrank == 4 else dtype}: estimate {est}, triton {real} "
              f"{'ok' if est >= real else 'UNDER'}", flush=True)
    print(f"triton {triton.__version__}: {under} estimates below Triton's figure")
    return 1 if under else 0


if __name__ == "__main__":
    sys.exit(main())
