"""The dropout mask as a pure function of (seed, row, col); mirrors reference.dropout_keep bit for bit."""
import functools

import torch
import triton
import triton.language as tl

from . import configs


PROGRAMS_PER_SM = 8  # lowrank_backward's grid (see there)


@triton.jit
def hash32(x):
    # lowbias32; x is uint32 and multiplication wraps mod 2**32.
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def load_seed(seed_ptr):
    return (tl.load(seed_ptr) & 0x7FFFFFFF).to(tl.uint32)


@triton.jit
def keep_mask(seed, rows, cols, threshold):
    """Boolean (len(rows), len(cols)) tile: True where the element survives dropout."""
    row_h = hash32(rows.to(tl.uint32) ^ seed)
    h = hash32(row_h[:, None] ^ cols.to(tl.uint32)[None, :])
    return (h >> 8).to(tl.int32) >= threshold


@triton.jit
def dropped(x, keep, keep_scale):
    """x where kept, scaled by 1/(1-p) and rounded to x's dtype as torch rounds x * scale; 0 elsewhere."""
    return tl.where(keep, (x.to(tl.float32) * keep_scale).to(x.dtype), 0.0).to(x.dtype)


@triton.jit
def _apply_kernel(x_ptr, out_ptr, seed_ptr, M, K, stride_xm, stride_om, threshold, keep_scale,
                  BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """out = mask ⊙ x / (1 - p), rounded to x's dtype as torch rounds x * scale."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    inside = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :], mask=inside, other=0.0)
    kept = dropped(x, keep_mask(load_seed(seed_ptr), rows, cols, threshold), keep_scale)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :], kept, mask=inside)


@functools.lru_cache(maxsize=64)
def mask_args(p: float):
    """(threshold, keep scale) of p, as reference.dropout_threshold / dropout_scale give them."""
    from ..reference import dropout_scale, dropout_threshold
    return dropout_threshold(p), dropout_scale(p)


def apply(x2d, p: float, seed):
    """reference.apply_dropout's values in one kernel (the same mask for the same seed), in a new tensor;
    x2d has unit column stride."""
    M, K = x2d.shape
    out = torch.empty((M, K), device=x2d.device, dtype=x2d.dtype)
    if M == 0 or K == 0:
        return out
    threshold, keep_scale = mask_args(p)
    grid = ((M + 15) // 16, (K + 255) // 256)  # plain integers: triton.cdiv costs host time per call
    _apply_kernel[grid](x2d, out, seed, M, K, x2d.stride(0), out.stride(0), threshold, keep_scale,
                        BLOCK_M=16, BLOCK_K=256, num_warps=4)
    return out


@triton.jit
def _lowrank_backward_kernel(x_ptr, g_ptr, a_ptr, dx_ptr, da_ptr, seed_ptr, M, K, R, M_PER_SPLIT,
                             stride_xm, stride_gm, stride_ar, stride_dxm, stride_ds, stride_dr,
                             threshold, keep_scale, HAS_DX: tl.constexpr, DOT_PRECISION: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """One pass over x for the low-rank backward with dropout, g = s·dy·B given (M×R, x's dtype):
    dA partial (R×BLOCK_K, float32, one per row split) = gᵀ·(mask ⊙ x)/(1-p), and, with HAS_DX,
    dx += mask ⊙ (g·A)/(1-p), rounded as torch rounds the same steps (g·A to x's dtype, then the scale)."""
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    a = tl.load(a_ptr + rr[:, None] * stride_ar + cols[None, :], mask=(rr[:, None] < R) & (cols[None, :] < K),
                other=0.0)
    seed = load_seed(seed_ptr)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    first = tl.program_id(1) * M_PER_SPLIT
    for m0 in range(first, tl.minimum(first + M_PER_SPLIT, M), BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        inside = (rows[:, None] < M) & (cols[None, :] < K)
        keep = keep_mask(seed, rows, cols, threshold)
        g = tl.load(g_ptr + rows.to(tl.int64)[:, None] * stride_gm + rr[None, :],
                    mask=(rows[:, None] < M) & (rr[None, :] < R), other=0.0)
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :], mask=inside, other=0.0)
        xd = dropped(x, keep, keep_scale)
        acc = tl.dot(tl.trans(g), xd, acc, input_precision=DOT_PRECISION)
        if HAS_DX:
            lora = tl.dot(g, a.to(g.dtype), input_precision=DOT_PRECISION).to(x.dtype)
            masked = dropped(lora, keep, keep_scale)
            dx_ptrs = dx_ptr + rows.to(tl.int64)[:, None] * stride_dxm + cols[None, :]
            dx = tl.load(dx_ptrs, mask=inside, other=0.0)
            tl.store(dx_ptrs, (dx.to(tl.float32) + masked.to(tl.float32)).to(dx_ptr.dtype.element_ty), mask=inside)
    tl.store(da_ptr + tl.program_id(1) * stride_ds + rr[:, None] * stride_dr + cols[None, :], acc,
             mask=(rr[:, None] < R) & (cols[None, :] < K))


def lowrank_backward(x2d, g, a, dx, p: float, seed):
    """The masked low-rank backward in one kernel: returns dA = gᵀ·dropout(x) (R×K, float32) and, where dx is
    given, adds mask ⊙ (g·A)/(1-p) into it. x2d, g, a and dx have unit column stride; a is in g's dtype."""
    M, K = x2d.shape
    R = g.shape[1]
    block_k = 32 if x2d.dtype == torch.float32 else 64  # float32 IEEE products: 64 columns spilled on sm_90a
    k_blocks = (K + block_k - 1) // block_k
    # about PROGRAMS_PER_SM programs per SM: dx's read-modify-write is not pipelined, so each program waits on
    # it once per row block; two per SM (the first form) took 147 µs at 8192×4096 on an H200, eight 96 µs. The
    # row splits are summed in fixed order.
    splits = max(1, min((M + 63) // 64, PROGRAMS_PER_SM * configs.sm_count(x2d) // k_blocks))
    m_per_split = ((M + splits - 1) // splits + 31) // 32 * 32
    splits = (M + m_per_split - 1) // m_per_split if M else 1
    part = torch.empty((splits, R, K), device=x2d.device, dtype=torch.float32)
    threshold, keep_scale = mask_args(p)
    _lowrank_backward_kernel[(k_blocks, splits)](
        x2d, g, a, dx if dx is not None else x2d, part, seed, M, K, R, m_per_split,
        x2d.stride(0), g.stride(0), a.stride(0), dx.stride(0) if dx is not None else 0, part.stride(0),
        part.stride(1), threshold, keep_scale, HAS_DX=dx is not None,
        # float32 products as torch's float32 matmul forms them (not TF32), so float32 inputs keep their accuracy
        DOT_PRECISION="ieee" if x2d.dtype == torch.float32 else "tf32",
        BLOCK_M=32, BLOCK_K=block_k, BLOCK_R=max(16, 1 << (R - 1).bit_length()), num_warps=4)
    return part[0] if splits == 1 else part.sum(0)
