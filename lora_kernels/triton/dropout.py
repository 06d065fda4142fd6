"""The dropout mask as a pure function of (seed, row, col); mirrors reference.dropout_keep bit for bit."""
import functools

import torch
import triton
import triton.language as tl


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
def _apply_kernel(x_ptr, out_ptr, seed_ptr, M, K, stride_xm, stride_om, threshold, keep_scale,
                  ACCUMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """out = mask ⊙ x / (1 - p), or out += that (ACCUMULATE), rounded to out's dtype as torch rounds x * scale."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    inside = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :], mask=inside, other=0.0)
    kept = tl.where(keep_mask(load_seed(seed_ptr), rows, cols, threshold),
                    (x.to(tl.float32) * keep_scale).to(x.dtype), 0.0)
    o_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
    if ACCUMULATE:
        kept = (tl.load(o_ptrs, mask=inside, other=0.0).to(tl.float32) + kept.to(tl.float32))
    tl.store(o_ptrs, kept.to(out_ptr.dtype.element_ty), mask=inside)


@functools.lru_cache(maxsize=64)
def _mask_args(p: float):
    from ..reference import dropout_scale, dropout_threshold
    return dropout_threshold(p), dropout_scale(p)


def apply(x2d, p: float, seed, out=None, accumulate: bool = False):
    """reference.apply_dropout's values in one kernel (the same mask for the same seed): dropout(x2d) into a
    new tensor or `out`, or added to `out` (accumulate). x2d and out have unit column stride."""
    M, K = x2d.shape
    if out is None:
        out = torch.empty((M, K), device=x2d.device, dtype=x2d.dtype)
    if M == 0 or K == 0:
        return out
    threshold, keep_scale = _mask_args(p)
    grid = ((M + 15) // 16, (K + 255) // 256)  # plain integers: triton.cdiv costs host time per call
    _apply_kernel[grid](x2d, out, seed, M, K, x2d.stride(0), out.stride(0), threshold, keep_scale,
                        ACCUMULATE=accumulate, BLOCK_M=16, BLOCK_K=256, num_warps=4)
    return out
