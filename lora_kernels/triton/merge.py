"""Triton merge / unmerge: W ← round(W ± s·B·A), one read and one write of W, s·B·A in float32 registers."""
import torch
import triton
import triton.language as tl

from . import configs


@triton.jit
def _remerge_bits(w, delta, INT_TY: tl.constexpr):
    return (w.to(tl.float32) + delta).to(w.dtype).to(INT_TY, bitcast=True)


@triton.jit
def _merge_kernel(
    w_ptr, a_ptr, b_ptr, N, K, R, stride_wn, stride_an, stride_bn, scale,
    UNMERGE: tl.constexpr, INT_TY: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    # W's tile is loaded first so that its trip to memory overlaps the loads of A, B and the product.
    w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :]
    ok = (rn[:, None] < N) & (rk[None, :] < K)
    w = tl.load(w_ptrs, mask=ok, other=0.0)
    b = tl.load(b_ptr + rn.to(tl.int64)[:, None] * stride_bn + rr[None, :],
                mask=(rn[:, None] < N) & (rr[None, :] < R), other=0.0).to(tl.float32)
    a = tl.load(a_ptr + rr[:, None] * stride_an + rk[None, :],
                mask=(rr[:, None] < R) & (rk[None, :] < K), other=0.0).to(tl.float32)
    delta = tl.dot(b, a, input_precision="ieee") * scale
    if UNMERGE:
        target = w.to(INT_TY, bitcast=True)
        base = (w.to(tl.float32) - delta).to(w.dtype)
        base_bits = base.to(INT_TY, bitcast=True)
        up = (base_bits + 1).to(w.dtype, bitcast=True)
        down = (base_bits - 1).to(w.dtype, bitcast=True)
        found = _remerge_bits(base, delta, INT_TY) == target
        up_ok = (~found) & (_remerge_bits(up, delta, INT_TY) == target)
        down_ok = (~found) & (~up_ok) & (_remerge_bits(down, delta, INT_TY) == target)
        out = tl.where(up_ok, up, tl.where(down_ok, down, base))
    else:
        out = (w.to(tl.float32) + delta).to(w.dtype)
    tl.store(w_ptrs, out, mask=ok)


_INT = {torch.float32: tl.int32, torch.float16: tl.int16, torch.bfloat16: tl.int16}


def merge_(weight, lora_A, lora_B, scaling, unmerge):
    N, K = weight.shape
    R = lora_A.shape[0]
    A = lora_A.contiguous()
    B = lora_B.contiguous()
    block_r = max(16, triton.next_power_of_2(R))
    block_n, block_k = (16, 32) if configs.interpreting() else (64, 64 if block_r <= 64 else 32)
    grid = (triton.cdiv(N, block_n), triton.cdiv(K, block_k))
    _merge_kernel[grid](weight, A, B, N, K, R, weight.stride(0), A.stride(0), B.stride(0), float(scaling),
                        UNMERGE=unmerge, INT_TY=_INT[weight.dtype],
                        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r, num_warps=4)
