"""Launcher for mixed-adapter batches: rows sorted by slot once, then the shared fused-linear kernels
(skinny x·Aᵀ and the GEMM with low-rank steps) run in their MULTI mode. No host synchronisation."""
import torch

from .fused_linear import Multi, gemm_lowrank, skinny_rank


# Below this many rows one or two tiles hold every row whatever their order, so sorting by slot saves no
# low-rank steps and only adds launches (sort, index conversions, un-permuting x·Aᵀ): rows stay in place.
SORT_MIN_ROWS = 65


def multi_forward(x2d, weight, lora_A, lora_B, scalings, bias, ids, allow_tf32=False):
    """(y, xa): y = x·Wᵀ + bias + per-row s[id]·(x·A[id]ᵀ)·B[id]ᵀ, xa in natural row order (float32).

    The kernels walk the distinct slots present in each tile, so any row order is correct; sorting only
    makes tiles hold fewer slots."""
    ids = ids.to(torch.int32)
    sort = x2d.shape[0] >= SORT_MIN_ROWS
    if sort:
        slots, perm = torch.sort(ids, stable=True)
        perm = perm.to(torch.int32)
    else:
        slots, perm = ids, torch.arange(x2d.shape[0], device=x2d.device, dtype=torch.int32)
    multi = Multi(perm, slots, scalings.to(torch.float32).contiguous())
    xa_pos = skinny_rank(x2d, lora_A.transpose(1, 2), multi=multi, allow_tf32=allow_tf32)
    y = torch.empty((x2d.shape[0], weight.shape[0]), device=x2d.device, dtype=x2d.dtype)
    gemm_lowrank(x2d, weight.t(), xa_pos, lora_B.transpose(1, 2), y, bias=bias, multi=multi,
                 allow_tf32=allow_tf32)
    if not sort:
        return y, xa_pos
    return y, torch.empty_like(xa_pos).index_copy_(0, perm.long(), xa_pos)
