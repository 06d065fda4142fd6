"""Tile configurations, kept apart from the kernels so tuning never touches kernel bodies."""
import functools
import os

import triton

from .. import _env


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    import torch
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(t) -> int:
    """Streaming multiprocessors of t's GPU (8 for CPU tensors under the interpreter)."""
    return _sm_count(t.device.index or 0) if t.is_cuda else 8


interpreting = _env.interpreting


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host code: triton.cdiv is a constexpr function there, whose call wrapper costs
    microseconds of host time, and the launch paths call it several times per layer."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1), for host code (see cdiv)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def m_bucket(m: int) -> int:
    """Autotune key for M: powers of two up to 4096, so a new batch size rarely retunes."""
    return min(next_pow2(max(m, 1)), 4096)


def _cfg(bm, bn, bk, warps, stages, group=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group},
                         num_warps=warps, num_stages=stages)


# Large-M tiles (Hopper: wgmma wants >= 64 rows per warpgroup) and decode tiles (M <= 64:
# narrow N tiles so that many CTAs stream W at once).
GEMM_CONFIGS = [
    _cfg(128, 256, 64, 8, 3),
    _cfg(256, 128, 64, 8, 3),
    _cfg(128, 128, 64, 4, 4),
    _cfg(128, 128, 64, 8, 4),
    _cfg(64, 128, 64, 4, 4),
    # 16-column tiles: 256 programs over N = 4096 instead of 128, twice the loads in flight for decode
    # (the 32-column tile streamed W at 1.2 TB/s on an H100, bench/NOTES.md).
    _cfg(16, 16, 256, 4, 4),
    _cfg(16, 16, 512, 4, 3),
    _cfg(16, 32, 256, 4, 4),
    _cfg(16, 64, 128, 4, 5),
    _cfg(32, 64, 128, 4, 4),
    _cfg(64, 64, 128, 4, 4),
]

# Float32 operands without TF32 (DOT_PRECISION "ieee") multiply on the FMA units: every product of a tile is
# an unrolled instruction, so the tensor-core tiles above spill (~10 KB per thread at 128x128x64) and took
# 10-20 s each to compile on the CPU, minutes per new shape on a GPU host; these stay within 255 registers.
FMA_GEMM_CONFIGS = [
    _cfg(64, 64, 32, 4, 3),
    _cfg(32, 64, 32, 4, 3),
    _cfg(16, 64, 32, 4, 3),
]

# One small tile for the interpreter: correctness only.
INTERPRET_GEMM = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}


def tune_bench(fn, quantiles):
    # Shorter than Triton's default (25 ms warm-up, 100 ms timing per config): a few ms tell these tiles
    # apart. LORA_KERNELS_QUICK_TUNE=1 (the GPU tests) skips tuning (see prune_gemm_configs).
    warmup, rep = (1, 3) if os.environ.get("LORA_KERNELS_QUICK_TUNE") == "1" else (10, 40)
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=quantiles)


def _smem_limit() -> int:
    import torch
    if not torch.cuda.is_available():
        return 227 * 1024  # Hopper's opt-in limit; only the interpreter runs without a GPU
    return torch.cuda.get_device_properties(torch.cuda.current_device()).shared_memory_per_block_optin


def gemm_smem_bytes(cfg: dict, stages: int, elem: int, block_r: int, fold: bool, nf4: bool,
                    lowrank_elem: int = 0, nf4_rows: bool = False) -> int:
    """Shared memory of one program: the pipelined A and B tiles (the folded Aᵀ tile with FOLD_XA) and
    the low-rank L and Rt tiles, loaded once. Under NF4 the per-element gather (layout 0) pipelines, per B
    element, its code byte, its float32 scale and half a packed byte; the whole-row layouts (nf4_rows:
    NF4_LAYOUT 1 and 2) only the packed half byte and one float32 absmax per 64 elements. Either way the
    dequantised tile is staged once more (float32).
    lowrank_elem: bytes per element of the adapter tiles as loaded (4 for peft's float32 adapters under
    16-bit activations); wider than the activations, Triton stages them once more at their own width.
    Fitted to Triton's own figures (bench/results/smem-estimate-check-sm90a-*.txt)."""
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    if nf4:
        b_bytes = (bk * bn) // 2 + (bk * bn) // 16 if nf4_rows else (11 * bk * bn) // 2
    else:
        b_bytes = bk * bn * elem
    per_stage = bm * bk * elem + b_bytes + (bk * block_r * elem if fold else 0)
    once = block_r * (bm + bn) * elem
    if fold:  # the float32 x·Aᵀ accumulator staged for the low-rank dot, and up to two more Aᵀ slices
        once += bm * block_r * 4 + 2 * bk * block_r * elem
    if nf4:
        once += bk * bn * 4
    if lowrank_elem > elem:
        once += block_r * (bm + bn) * lowrank_elem
        if fold:
            per_stage += bk * block_r * lowrank_elem
    return stages * per_stage + once


SMEM_MARGIN = 1.1


def fit_stages(cfgs, elem: int, block_r: int, fold: bool, nf4: bool, lowrank_elem: int,
               nf4_rows: bool = False) -> list:
    """The tiles that fit in shared memory, each with num_stages lowered (down to 2) until it does; a launch
    past the limit fails outright."""
    limit = int(_smem_limit() / SMEM_MARGIN)
    fitted = []

    def need(c, stages):
        return gemm_smem_bytes(c.kwargs, stages, elem, block_r, fold, nf4, lowrank_elem, nf4_rows)
    for c in cfgs:
        stages = c.num_stages
        while stages > 2 and need(c, stages) > limit:
            stages -= 1
        if need(c, stages) <= limit:
            fitted.append(triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=stages))
    return fitted


def prune_gemm_configs(configs, named_args, **kwargs):
    """Keep the tiles meant for this M, and lower num_stages (down to 2) until a tile fits in shared
    memory: float32 operands need twice the bf16 bytes, and a launch past the limit fails outright."""
    mb = named_args["M_BUCKET"]
    if kwargs.get("DOT_PRECISION") == "ieee":
        # the low-rank step unrolls BLOCK_M·BLOCK_N·BLOCK_R products too: 64x64 at rank 256 spilled 4.5 KB
        fma_work = 64 * 64 * 64 // kwargs.get("BLOCK_R", 16)
        configs = [c for c in FMA_GEMM_CONFIGS if c.kwargs["BLOCK_M"] <= max(mb, 16)
                   and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= max(fma_work, 16 * 64)]
    else:
        configs = [c for c in configs if c not in FMA_GEMM_CONFIGS]
    big = mb >= 256
    kept = [c for c in configs if (c.kwargs["BLOCK_M"] >= 64) == big or mb in (64, 128)] or list(configs)
    if kwargs.get("LOWRANK_DROPOUT"):
        # The mask rebuilt in registers: a 128x256 dx tile spilled 316 bytes with Triton 3.6 (sm_90a).
        kept = [c for c in kept if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 128] or kept
    elem = named_args["a_ptr"].element_size()
    block_r, fold, nf4 = kwargs.get("BLOCK_R", 16), kwargs.get("FOLD_XA", False), kwargs.get("NF4", False)
    # the widest adapter operand as loaded: Rt (B, or A for dx), and with FOLD_XA the folded Aᵀ slices
    adapters = [named_args.get("r_ptr")] + ([named_args.get("fa_ptr")] if fold else [])
    lowrank = max((t.element_size() for t in adapters if hasattr(t, "element_size")), default=0)
    # The estimate has matched Triton's figure for plain tiles; the margin covers layout scratch that
    # it does not model (seen: 24 KB more than estimated for a FOLD_XA tile).
    nf4_rows = nf4 and kwargs.get("NF4_LAYOUT", 0) != 0
    fitted = fit_stages(kept, elem, block_r, fold, nf4, lowrank, nf4_rows)
    if fitted and os.environ.get("LORA_KERNELS_QUICK_TUNE") == "1":
        return fitted[:1]  # correctness runs: one tile per shape, so one compile instead of one per candidate
    if fitted:
        return fitted
    small = min(configs, key=lambda c: gemm_smem_bytes(c.kwargs, 1, elem, block_r, fold, nf4, lowrank, nf4_rows))
    return [triton.Config(dict(small.kwargs), num_warps=small.num_warps, num_stages=1)]


def skinny_split(rows: int, cols_blocks: int, sms: int = 132) -> int:
    """Row-splits for the skinny kernels so that about two CTAs land on each SM."""
    want = max(1, (2 * sms) // max(cols_blocks, 1))
    return max(1, min(want, cdiv(rows, 64), 64))


# Fold x·Aᵀ into the GEMM (one launch) up to this many rows: there the GEMM streams W and the extra
# BLOCK_M×BLOCK_K×r product per step costs nothing; above it the separate skinny kernel is cheaper than
# r/BLOCK_N more tensor-core work in every program. Not with dropout (the mask would be rebuilt per program).
FOLD_XA_MAX_ROWS = 64
FOLD_XA_MAX_RANK = 128


def fold_xa(m: int, r: int, dropout_on: bool, elem_bytes: int = 2) -> bool:
    # 16-bit inputs only: with float32 the folded Aᵀ slices leave too little shared memory for a pipeline.
    return 0 < m <= FOLD_XA_MAX_ROWS and r <= FOLD_XA_MAX_RANK and not dropout_on and elem_bytes == 2
