"""Launcher for mixed-adapter batches: rows sorted by slot once, then the shared fused-linear kernels
(skinny x·Aᵀ and the GEMM with low-rank steps) run in their MULTI mode. No host synchronisation."""
import torch

from .fused_linear import Multi, gemm_lowrank, skinny_rank


def multi_forward(x2d, weight, lora_A, lora_B, scalings, bias, ids, allow_tf32=False):
    """(y, xa): y = x·Wᵀ + bias + per-row s[id]·(x·A[id]ᵀ)·B[id]ᵀ, xa in natural row order (float32)."""
    sorted_ids, perm = torch.sort(ids.to(torch.int32), stable=True)
    multi = Multi(perm.to(torch.int32), sorted_ids, scalings.to(torch.float32).contiguous())
    xa_sorted = skinny_rank(x2d, lora_A.transpose(1, 2), multi=multi, allow_tf32=allow_tf32)
    y = torch.empty((x2d.shape[0], weight.shape[0]), device=x2d.device, dtype=x2d.dtype)
    gemm_lowrank(x2d, weight.t(), xa_sorted, lora_B.transpose(1, 2), y, bias=bias, multi=multi,
                 allow_tf32=allow_tf32)
    xa = torch.empty_like(xa_sorted).index_copy_(0, perm, xa_sorted)
    return y, xa
