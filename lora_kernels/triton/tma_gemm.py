"""The low-rank GEMM for Hopper: persistent programs fed by TMA tensor descriptors.

Same contract as fused_linear.gemm_lowrank for its plain case (16-bit operands, no 4-bit W, no mixed adapters,
no folded x·Aᵀ): out = a·b + (s·L)·Rt (+ bias), the low-rank step first so a dropout mask can be applied to
the accumulator while it holds nothing else. What differs is how the main loop is fed: one program per SM
walks the output tiles, and the A and B tiles arrive by the copy engine (TMA, zero-filled past the edges)
instead of per-thread pointer loads, which is how Triton's Hopper matmuls approach cuBLAS. Whether it beats
the pointer-fed kernel is measured per shape (triton.measured; LORA_KERNELS_GEMM=pointers|tma forces one).
"""
import functools
import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import configs
from .dropout import keep_mask, load_seed
from .tiles import lowrank_dot, output_tile


@triton.jit
def _tma_lowrank_kernel(
    a_desc, b_desc, c_ptr, l_ptr, r_ptr, bias_ptr, scale_ptr, seed_ptr,
    M, N, K, R, stride_cm, stride_lm, stride_lr, stride_rr, stride_rn, scale, threshold, keep_scale,
    B_ROWS_ARE_N: tl.constexpr, HAS_BIAS: tl.constexpr, SCALE_FROM_PTR: tl.constexpr,
    LOWRANK_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    FLATTEN: tl.constexpr,
):
    """B_ROWS_ARE_N: b_desc describes B transposed, (N, K) row-major (the forward's W); else (K, N) (dx's W).
    FLATTEN: the tile loop is flattened into the K loop, so the next tile's first loads are issued while this
    tile finishes (a tuned choice: it won up to 5 % at some shapes and lost up to 6 % at others)."""
    DT: tl.constexpr = c_ptr.dtype.element_ty
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    if SCALE_FROM_PTR:
        s = tl.load(scale_ptr).to(tl.float32)
    else:
        s = scale
    for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, tl.num_programs(0), flatten=FLATTEN):
        pid_m, pid_n, offs_m, offs_n, rm, rn = output_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if LOWRANK_DROPOUT:  # the mask must meet the low-rank term alone: it goes first
            acc = lowrank_dot(acc, l_ptr, r_ptr, rm, rn, R, stride_lm, stride_lr, stride_rr, stride_rn,
                               tl.full((BLOCK_M,), 1.0, tl.float32) * s, DT, BLOCK_R, DOT_PRECISION)
            keep = keep_mask(load_seed(seed_ptr), offs_m, offs_n, threshold)
            acc = tl.where(keep, acc * keep_scale, 0.0)
        for k in range(k_tiles):
            a = a_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
            if B_ROWS_ARE_N:
                b = b_desc.load([pid_n * BLOCK_N, k * BLOCK_K]).T
            else:
                b = b_desc.load([k * BLOCK_K, pid_n * BLOCK_N])
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if not LOWRANK_DROPOUT:  # last K step: its loads stay out of the pipelined loop's registers
            acc = lowrank_dot(acc, l_ptr, r_ptr, rm, rn, R, stride_lm, stride_lr, stride_rr, stride_rn,
                               tl.full((BLOCK_M,), 1.0, tl.float32) * s, DT, BLOCK_R, DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn).to(tl.float32)[None, :]
        c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, acc.to(DT), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def _cfg(bm, bn, bk, warps, stages, flatten=False):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "FLATTEN": flatten},
                         num_warps=warps, num_stages=stages)


# Hopper tiles: 128-row blocks for wgmma over two warpgroups, 64- or 128-wide K steps (TMA's 128-byte swizzle).
# Compiled for sm_90a (bench/aot_check.py): 128×128 and 128×64 keep every value in registers; 128×256 and
# 256×128 spill 128 / 48 bytes, kept because tuning (per shape) may still find them fastest. The two large
# tiles also run flattened (bench/results/tma-sweep-*: 128×256 forward 8192×4096×4096 422 → 402 µs flattened,
# 8192×4096×14336 1490 → 1586 µs), so tuning decides per shape.
CONFIGS = [_cfg(128, 256, 64, 8, 3), _cfg(128, 256, 64, 8, 3, True), _cfg(256, 128, 64, 8, 3),
           _cfg(256, 128, 64, 8, 3, True), _cfg(128, 128, 64, 8, 4), _cfg(128, 128, 128, 8, 3),
           _cfg(128, 64, 64, 4, 4)]
INTERPRET_CFG = _cfg(16, 32, 32, 4, 1)
MIN_ROWS = 128  # fewer rows take the decode paths


def _tma_view(t) -> bool:
    return (t.dim() == 2 and t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0
            and t.data_ptr() % 16 == 0)


def b_rows_are_n(b):
    """How B (K×N) can be described: True when its memory is (N, K) row-major (B = Wᵀ), False when (K, N)
    row-major, None when neither (no descriptor)."""
    if _tma_view(b.t()):
        return True
    return False if _tma_view(b) else None


def eligible(a, b, out) -> bool:
    """16-bit a, b and out of one dtype, descriptor-friendly strides and alignment, enough rows, a Hopper GPU
    (or the interpreter)."""
    if a.dtype not in (torch.float16, torch.bfloat16) or b.dtype != a.dtype or out.dtype != a.dtype:
        return False
    if a.shape[0] < MIN_ROWS or not _tma_view(a) or out.stride(1) != 1 or b_rows_are_n(b) is None:
        return False
    if configs.interpreting():
        return True
    return a.is_cuda and _is_hopper(a.device.index or 0)


@functools.lru_cache(maxsize=None)
def _is_hopper(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] == 9


_best: dict = {}


def launch(a, b, out, low_l, low_r, bias, s, s_ptr, s_from_ptr, dropout, precision, block_r):
    """out = a·b + (s·low_l)·low_r (+ bias), as gemm_lowrank's plain case; the tile is tuned once per key."""
    M, K = a.shape
    N = b.shape[1]
    rows_n = b_rows_are_n(b)
    b_mem = b.t() if rows_n else b
    tail = (out, low_l, low_r, bias if bias is not None else a, s_ptr,
            dropout.seed if dropout.on else a, M, N, K, low_l.shape[1], out.stride(0), low_l.stride(0),
            low_l.stride(1), low_r.stride(0), low_r.stride(1), s, dropout.threshold, dropout.keep_scale)
    flags = dict(B_ROWS_ARE_N=rows_n, HAS_BIAS=bias is not None, SCALE_FROM_PTR=s_from_ptr,
                 LOWRANK_DROPOUT=dropout.on, DOT_PRECISION=precision, BLOCK_R=block_r)
    programs = configs.sm_count(a) if a.is_cuda else 4

    def run(cfg):
        bm, bn, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
        a_desc = TensorDescriptor(a, [M, K], [a.stride(0), 1], [bm, bk])
        b_desc = TensorDescriptor(b_mem, list(b_mem.shape), [b_mem.stride(0), 1], [bn, bk] if rows_n else [bk, bn])
        grid = (min(programs, configs.cdiv(M, bm) * configs.cdiv(N, bn)),)
        _tma_lowrank_kernel[grid](a_desc, b_desc, *tail, **flags, **cfg.kwargs, num_warps=cfg.num_warps,
                                  num_stages=cfg.num_stages)

    if configs.interpreting():
        run(INTERPRET_CFG)
        return out
    key = (a.device.index, configs.m_bucket(M), N, K, low_l.shape[1], a.dtype, low_r.dtype, *flags.values())
    cfg = _best.get(key)
    if cfg is None:
        # float32 adapters (peft's default) are staged at their own width as well (configs.gemm_smem_bytes)
        lowrank_elem = max(low_l.element_size(), low_r.element_size())
        fitting = configs.fit_stages(CONFIGS, a.element_size(), block_r, False, False, lowrank_elem)
        if not fitting:
            raise RuntimeError(f"no TMA tile fits in shared memory for {key}")  # the pointer feed serves it
        if len(fitting) == 1 or os.environ.get("LORA_KERNELS_QUICK_TUNE") == "1":
            cfg = fitting[0]
        else:
            cfg = min(fitting, key=lambda c: configs.tune_bench(lambda: run(c), quantiles=None))
        _best[key] = cfg
    run(cfg)
    return out
