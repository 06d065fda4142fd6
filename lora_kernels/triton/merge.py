"""Triton merge / unmerge: W ← round(W ± s·B·A), one read and one write of W, s·B·A in float32 registers.
The same kernel writes round(W + s·B·A) to a new tensor instead (merged_copy) for auto's merged-weight forward.

One kernel body serves one layer and a group of same-shape layers (grid axis 2 = layer): a group passes the
first layer's tensors plus each layer's distance from them in 16-byte units, so the compiler still knows
every row start is 16-byte aligned and keeps vector loads."""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._transfer import to_device_async
from . import configs, waves


@triton.jit
def _merge_kernel(
    w_ptr, o_ptr, a_ptr, b_ptr, w_offs_ptr, a_offs_ptr, b_offs_ptr, scales_ptr,
    N, K, R, stride_wn, stride_an, stride_bn, scale,
    UNMERGE: tl.constexpr, INT_TY: tl.constexpr, GROUPED: tl.constexpr, PRECISION: tl.constexpr,
    W_VEC: tl.constexpr, A_VEC: tl.constexpr, B_VEC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, STAGES: tl.constexpr,
    HALF_TY: tl.constexpr = tl.bfloat16,
):
    # Program (k, n) owns column strip k, whose A columns it loads once, and walks the row tiles n,
    # n + row_programs, ...; per tile it reads B's rows (R values each) and W's rows in BLOCK_K-wide segments
    # (512 bytes of a 16-bit W at rank 16). Neighbouring programs hold neighbouring strips of the same rows.
    pid_k = tl.program_id(0)
    if GROUPED:
        layer = tl.program_id(2)
        w_ptr += tl.load(w_offs_ptr + layer) * W_VEC
        o_ptr += tl.load(w_offs_ptr + layer) * W_VEC  # a group merges in place: o_ptr is w_ptr
        a_ptr += tl.load(a_offs_ptr + layer) * A_VEC
        b_ptr += tl.load(b_offs_ptr + layer) * B_VEC
        scale = tl.load(scales_ptr + layer)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    a = tl.load(a_ptr + rr[:, None] * stride_an + rk[None, :], mask=(rr[:, None] < R) & (rk[None, :] < K), other=0.0)
    if PRECISION == "bf16x6":
        a_hi, a_mid, a_lo = _split_bf16(a, HALF_TY)  # once per program: the strip is the program's for life
    else:
        a_hi, a_mid, a_lo = a, a, a
    for nt in tl.range(tl.program_id(1), tl.cdiv(N, BLOCK_N), tl.num_programs(1), num_stages=STAGES):
        rn = nt * BLOCK_N + tl.arange(0, BLOCK_N)
        row_offs = rn.to(tl.int64)[:, None] * stride_wn + rk[None, :]
        w_ptrs = w_ptr + row_offs
        ok = (rn[:, None] < N) & (rk[None, :] < K)
        w = tl.load(w_ptrs, mask=ok, other=0.0)
        b = tl.load(b_ptr + rn.to(tl.int64)[:, None] * stride_bn + rr[None, :],
                    mask=(rn[:, None] < N) & (rr[None, :] < R), other=0.0)
        delta = _delta(b, a_hi, a_mid, a_lo, PRECISION, HALF_TY) * scale
        tl.store(o_ptr + row_offs, _merged_tile(w, delta, UNMERGE, INT_TY), mask=ok)


@triton.jit
def _split_bf16(v, HALF_TY: tl.constexpr):
    """v (float32) as hi + mid + lo, three bfloat16 values holding its 24 significant bits (the same exponent
    range). Held as HALF_TY: bfloat16 on the GPU; float32 under the interpreter, whose dot multiplies
    bfloat16's raw bits as integers (the values, and so the products, are the same)."""
    hi = v.to(tl.bfloat16)
    rest = v - hi.to(tl.float32)
    mid = rest.to(tl.bfloat16)
    lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
    return hi.to(HALF_TY), mid.to(HALF_TY), lo.to(HALF_TY)


@triton.jit
def _delta(b, a_hi, a_mid, a_lo, PRECISION: tl.constexpr, HALF_TY: tl.constexpr):
    """b·a in float32, the same products wherever the tile lies (merge and unmerge must agree bit for bit)."""
    if PRECISION == "bf16x6":
        # float32 adapters into a 16-bit W: six bfloat16 tensor-core products of the three-way splits,
        # smallest first; the three dropped (mid·lo, lo·mid, lo·lo) are under 2^-24 of the product, as
        # float32's own rounding. A's parts come split from the caller.
        b_hi, b_mid, b_lo = _split_bf16(b.to(tl.float32), HALF_TY)
        acc = tl.dot(b_hi, a_lo)
        acc = tl.dot(b_lo, a_hi, acc)
        acc = tl.dot(b_mid, a_mid, acc)
        acc = tl.dot(b_hi, a_mid, acc)
        acc = tl.dot(b_mid, a_hi, acc)
        return tl.dot(b_hi, a_hi, acc)
    elif PRECISION == "native":
        return tl.dot(b, a_hi)  # 16-bit adapters of one dtype: exact products, float32 sums
    else:
        return tl.dot(b.to(tl.float32), a_hi.to(tl.float32), input_precision=PRECISION)


@triton.jit
def _merged_tile(w, delta, UNMERGE: tl.constexpr, INT_TY: tl.constexpr):
    """round(w ± delta) in w's dtype: the same per-element arithmetic wherever the tile lies."""
    wf = w.to(tl.float32)
    if not UNMERGE:
        return (wf + delta).to(w.dtype)
    # base = round(w - delta) misses by at most one unit in the last place. When w is a merge's output (by the
    # same delta) some W' re-merges to w's bits, and re-merging is monotone in W': when base's re-merge
    # overshoots that W' is the neighbour below base, when it undershoots the one above. Without such a W'
    # (w changed since its merge) the neighbour is as near as base, within one unit either way. Values
    # are compared as the bits of their exact float32 images: 32-bit integer ops, no 16-bit byte moves.
    base = (wf - delta).to(w.dtype)
    base_f = base.to(tl.float32)
    again = (base_f + delta).to(w.dtype).to(tl.float32)
    found = again.to(tl.int32, bitcast=True) == wf.to(tl.int32, bitcast=True)
    # one step down in value is one step down in the bits of a positive number, up in those of a negative
    down = (again > wf) != (base_f.to(tl.int32, bitcast=True) < 0)
    near = (base.to(INT_TY, bitcast=True) + tl.where(down, -1, 1).to(INT_TY)).to(w.dtype, bitcast=True)
    return tl.where(found, base, near)


def _half_ty():
    return tl.float32 if configs.interpreting() else tl.bfloat16


_INT = {torch.float32: tl.int32, torch.float16: tl.int16, torch.bfloat16: tl.int16}


def _precision(w, A, B):
    """How the kernel forms b·a. A float32 W keeps exact float32 products; 16-bit adapters of one dtype go to
    the tensor cores as they are; any other mix into a 16-bit W as six bfloat16 products of three-way splits
    (float32's accuracy), A's split once per program. The float32 FMA loop left the kernel bound by
    instructions; Triton's TF32x3 re-split A and re-read it from shared memory on every tile."""
    if w.dtype == torch.float32:
        return "ieee"
    if A.dtype == B.dtype and A.dtype != torch.float32:
        return "native"
    # from rank 128 six products per element cost more than TF32x3's three and its shared-memory reloads
    # (sm_90a SASS: 214 against 196 instructions per element at rank 128)
    return "bf16x6" if A.shape[0] <= 64 else "tf32x3"


class Tiles(NamedTuple):
    block_n: int
    block_k: int
    block_r: int
    warps: int
    stages: int  # W tiles in flight per program


TILE_OVERRIDE = None  # a Tiles for every call (a tile sweep's hook), else _tiles' choice


def _tiles(R) -> Tiles:
    """16 rows per tile and W row segments as wide as the program's A strip (BLOCK_R x BLOCK_K, held for its
    life) allows at 4K values: 256 columns at rank 16, 32 from rank 128. sm_90a, float32 adapters, unmerge
    at rank 16: 126 registers, 23 instructions per element (taller tiles reached 193-255 registers and
    spilled from rank 128)."""
    if TILE_OVERRIDE is not None:
        return TILE_OVERRIDE
    block_r = max(16, configs.next_pow2(R))
    if configs.interpreting():
        return Tiles(16, 32, block_r, 4, 3)
    if block_r == 64:
        # measured (merge_tiles_sweep, H200, 4096², GPU time of the pair): 16x128 tiles 3.09x a copy, 16x64
        # 4.09x (the per-tile B split and product setup spread over twice the elements)
        return Tiles(16, 128, 64, 4, 3)
    return Tiles(16, min(256, max(32, 4096 // block_r)), block_r, 4, 3)


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
        tiles = _tiles(R)
        k_strips, n_tiles = configs.cdiv(K, tiles.block_k), configs.cdiv(N, tiles.block_n)
        variant = (weight.dtype, A.dtype, B.dtype, unmerge, layers > 0, tiles)
        row_programs = _row_programs(k_strips, n_tiles, max(layers, 1), weight, variant)
        grid = (k_strips, row_programs) + ((layers,) if layers else ())
        plan = (grid, tiles, variant)
        if waves.known(variant):
            _plans[key] = plan
    return plan


def _launch(plan, w, A, B, offsets, scales, scaling, unmerge, vec, out=None):
    grid, tiles, variant = plan
    N, K = w.shape
    kernel = _merge_kernel[grid](
        w, w if out is None else out, A, B, *offsets, scales, N, K, A.shape[0], w.stride(0), A.stride(0),
        B.stride(0), scaling,
        UNMERGE=unmerge, INT_TY=_INT[w.dtype], GROUPED=len(grid) == 3, PRECISION=_precision(w, A, B),
        W_VEC=vec[0], A_VEC=vec[1], B_VEC=vec[2], BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        BLOCK_R=tiles.block_r, STAGES=tiles.stages, HALF_TY=_half_ty(), num_warps=tiles.warps)
    waves.note(kernel, w, variant)


def merge_(weight, lora_A, lora_B, scaling, unmerge):
    A = lora_A.contiguous()
    B = lora_B.contiguous()
    _launch(_plan(weight, A, B, unmerge), weight, A, B, (weight,) * 3, weight, float(scaling), unmerge, (1, 1, 1))


def merged_copy(weight, lora_A, lora_B, scaling):
    """round(W + s·B·A) in a new tensor of W's shape and strides: merge_'s kernel and bits, W left as it is."""
    A = lora_A.contiguous()
    B = lora_B.contiguous()
    out = torch.empty_like(weight)
    _launch(_plan(weight, A, B, False), weight, A, B, (weight,) * 3, weight, float(scaling), False, (1, 1, 1), out)
    return out


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
    plan = _plan(w0, a0, b0, unmerge, layers=len(weights))
    scales = to_device_async(scalings, torch.float32, w0.device)
    offsets = _offsets_16b(weights, lora_As, lora_Bs)
    _launch(plan, w0, a0, b0, offsets, scales, 0.0, unmerge,
            tuple(16 // t.element_size() for t in (w0, a0, b0)))
