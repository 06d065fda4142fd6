"""Triton merge / unmerge: W ← round(W ± s·B·A), one read and one write of W, s·B·A in float32 registers.

One kernel body serves one layer and a group of same-shape layers (grid axis 2 = layer): a group passes the
first layer's tensors plus each layer's distance from them in 16-byte units, so the compiler still knows
every row start is 16-byte aligned and keeps vector loads."""
import torch
import triton
import triton.language as tl

from .._transfer import to_device_async
from . import configs, waves


@triton.jit
def _remerge_bits(w, delta, INT_TY: tl.constexpr):
    return (w.to(tl.float32) + delta).to(w.dtype).to(INT_TY, bitcast=True)


@triton.jit
def _merge_kernel(
    w_ptr, a_ptr, b_ptr, w_offs_ptr, a_offs_ptr, b_offs_ptr, scales_ptr,
    N, K, R, stride_wn, stride_an, stride_bn, scale,
    UNMERGE: tl.constexpr, INT_TY: tl.constexpr, GROUPED: tl.constexpr, PRECISION: tl.constexpr,
    W_VEC: tl.constexpr, A_VEC: tl.constexpr, B_VEC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, STAGES: tl.constexpr,
):
    # Program (k, n) owns column strip k, whose A columns it loads once, and walks the row tiles n,
    # n + row_programs, ...; per tile it reads B's rows (R values each) and W's rows in BLOCK_K-wide segments
    # (512 bytes of a 16-bit W at rank 16). Neighbouring programs hold neighbouring strips of the same rows.
    pid_k = tl.program_id(0)
    if GROUPED:
        layer = tl.program_id(2)
        w_ptr += tl.load(w_offs_ptr + layer) * W_VEC
        a_ptr += tl.load(a_offs_ptr + layer) * A_VEC
        b_ptr += tl.load(b_offs_ptr + layer) * B_VEC
        scale = tl.load(scales_ptr + layer)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    a = tl.load(a_ptr + rr[:, None] * stride_an + rk[None, :], mask=(rr[:, None] < R) & (rk[None, :] < K), other=0.0)
    for nt in tl.range(tl.program_id(1), tl.cdiv(N, BLOCK_N), tl.num_programs(1), num_stages=STAGES):
        rn = nt * BLOCK_N + tl.arange(0, BLOCK_N)
        w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :]
        ok = (rn[:, None] < N) & (rk[None, :] < K)
        w = tl.load(w_ptrs, mask=ok, other=0.0)
        b = tl.load(b_ptr + rn.to(tl.int64)[:, None] * stride_bn + rr[None, :],
                    mask=(rn[:, None] < N) & (rr[None, :] < R), other=0.0)
        _merge_tile(w, w_ptrs, ok, b, a, scale, UNMERGE, INT_TY, PRECISION)


@triton.jit
def _merge_tile(w, w_ptrs, ok, b, a, scale, UNMERGE: tl.constexpr, INT_TY: tl.constexpr, PRECISION: tl.constexpr):
    """W's tile ← round(w ± s·b·a), stored in place; the same per-element arithmetic wherever the tile lies."""
    if b.dtype == a.dtype and b.dtype != tl.float32:
        delta = tl.dot(b, a) * scale  # 16-bit adapters: exact products, float32 sums, on tensor cores
    else:
        delta = tl.dot(b.to(tl.float32), a.to(tl.float32), input_precision=PRECISION) * scale
    if UNMERGE:
        # base = round(w - delta) misses by at most one unit in the last place: re-merged, it must give w's bits
        # back. Re-merging is monotone in base, so when it overshoots only the neighbour below can hit w and
        # when it undershoots only the one above: one candidate to test, not two.
        target = w.to(INT_TY, bitcast=True)
        wf = w.to(tl.float32)
        base = (wf - delta).to(w.dtype)
        again = (base.to(tl.float32) + delta).to(w.dtype)
        found = again.to(INT_TY, bitcast=True) == target
        base_bits = base.to(INT_TY, bitcast=True)
        # one step down in value is one step down in the bits of a positive number, up in those of a negative
        step = tl.where((again.to(tl.float32) > wf) != (base_bits < 0), -1, 1).to(INT_TY)
        near = (base_bits + step).to(w.dtype, bitcast=True)
        out = tl.where((~found) & (_remerge_bits(near, delta, INT_TY) == target), near, base)
    else:
        out = (w.to(tl.float32) + delta).to(w.dtype)
    tl.store(w_ptrs, out, mask=ok)


_STAGES = 3  # W tiles in flight per program
_INT = {torch.float32: tl.int32, torch.float16: tl.int16, torch.bfloat16: tl.int16}


def _precision(w):
    """float32 adapters into a 16-bit W: three TF32 tensor-core products (about float32's accuracy, far below
    W's own rounding) instead of the float32 FMA loop, which left the kernel bound by instructions, not
    bytes. A float32 W keeps exact float32 products."""
    return "ieee" if w.dtype == torch.float32 else "tf32x3"


def _blocks(R):
    """(BLOCK_N, BLOCK_K, BLOCK_R): 16 rows per tile and W row segments as wide as the program's A strip
    (BLOCK_R x BLOCK_K, held for its life) allows at 4K values: 256 columns at rank 16, 32 from rank 128.
    sm_90a, float32 adapters, unmerge: 128 / 121 / 150 / 179 / 255 registers for ranks 16-256, no spills
    (taller tiles reached 193-255 registers and spilled from rank 128)."""
    block_r = max(16, configs.next_pow2(R))
    if configs.interpreting():
        return 16, 32, block_r
    return 16, min(256, max(32, 4096 // block_r)), block_r


def _row_programs(k_strips, n_tiles, layers, like, variant) -> int:
    """Programs per column strip: whole waves of resident programs (waves.per_unit), each walking at least
    four row tiles where there are enough (its loads then overlap)."""
    return waves.per_unit(k_strips * layers, n_tiles // 4, like, variant)


_plans: dict = {}  # (shape, rank, dtypes, unmerge, device, layers) -> (grid, tiles, variant), once final


def _plan(weight, A, B, unmerge, layers=0):
    """Grid and tiles of one layer's merge (layers=0), or of a group's (grid axis 2: its layers). Kept once
    the variant's residency is known (its first launch), so a repeated merge spends no host time
    re-deriving them (~5-10 us of a 4096^2 merge's ~50 on a slow host)."""
    N, K = weight.shape
    R = A.shape[0]
    key = (N, K, R, weight.dtype, A.dtype, B.dtype, unmerge, weight.device, layers)
    plan = _plans.get(key)
    if plan is None:
        block_n, block_k, block_r = _blocks(R)
        k_strips, n_tiles = configs.cdiv(K, block_k), configs.cdiv(N, block_n)
        variant = (weight.dtype, A.dtype, B.dtype, unmerge, layers > 0, block_r)
        row_programs = _row_programs(k_strips, n_tiles, max(layers, 1), weight, variant)
        grid = (k_strips, row_programs) + ((layers,) if layers else ())
        plan = (grid, (block_n, block_k, block_r), variant)
        if waves.known(variant):
            _plans[key] = plan
    return plan


def merge_(weight, lora_A, lora_B, scaling, unmerge):
    N, K = weight.shape
    A = lora_A.contiguous()
    B = lora_B.contiguous()
    grid, (block_n, block_k, block_r), variant = _plan(weight, A, B, unmerge)
    kernel = _merge_kernel[grid](weight, A, B, weight, weight, weight, weight, N, K, A.shape[0], weight.stride(0),
                                 A.stride(0), B.stride(0), float(scaling), UNMERGE=unmerge, INT_TY=_INT[weight.dtype],
                                 GROUPED=False, PRECISION=_precision(weight), W_VEC=1, A_VEC=1, B_VEC=1,
                                 BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r, STAGES=_STAGES, num_warps=4)
    waves.note(kernel, weight, variant)


def _offsets_16b(*lists):
    """Each tensor's distance from the first of its list in 16-byte units (all are 16-byte aligned:
    merging.group_layers), every list in one device table: one queued copy for the three of them."""
    offsets = []
    for tensors in lists:
        base = tensors[0].data_ptr()
        offsets += [(t.data_ptr() - base) // 16 for t in tensors]
    table = to_device_async(offsets, torch.int64, lists[0][0].device)
    return table.split(len(lists[0]))


def merge_group_(weights, lora_As, lora_Bs, scalings, unmerge):
    """merge_ on every layer of a group in one launch: same shape, dtypes and strides; no two weights overlap;
    every tensor contiguous and 16-byte aligned (the caller groups them so)."""
    w0, a0, b0 = weights[0], lora_As[0], lora_Bs[0]
    N, K = w0.shape
    R = a0.shape[0]
    grid, (block_n, block_k, block_r), variant = _plan(w0, a0, b0, unmerge, layers=len(weights))
    scales = to_device_async(scalings, torch.float32, w0.device)
    w_offs, a_offs, b_offs = _offsets_16b(weights, lora_As, lora_Bs)
    kernel = _merge_kernel[grid](
        w0, a0, b0, w_offs, a_offs, b_offs, scales,
        N, K, R, w0.stride(0), a0.stride(0), b0.stride(0), 0.0,
        UNMERGE=unmerge, INT_TY=_INT[w0.dtype], GROUPED=True, PRECISION=_precision(w0),
        W_VEC=16 // w0.element_size(), A_VEC=16 // a0.element_size(), B_VEC=16 // b0.element_size(),
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r, STAGES=_STAGES, num_warps=4)
    waves.note(kernel, w0, variant)
