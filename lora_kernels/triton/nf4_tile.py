"""NF4 dequantisation of a weight tile with vector loads, for the GEMM main loop.

W (rows × row_len) is stored row-major as 4-bit codes, two per byte (high nibble first), with one float32
absmax per 64 consecutive elements. When row_len is a multiple of 64, a tile of whole rows needs one load of
packed bytes per two elements and one absmax per 64 elements of a row, instead of a gather of the byte and of
the absmax for every element. The 16-entry code table is still looked up per element (an L1-resident gather).
Also here: the host-side views of a 4-bit W as the GEMM's B operand, the choice of layout, and W
dequantised whole (for many rows, where a cuBLAS GEMM over the dequantised W can beat dequantising per tile).
"""

import torch
import triton
import triton.language as tl

from . import configs


@triton.jit
def dequant_pairs(b_ptr, absmax_ptr, code_ptr, rows, row_ok, c0, row_len,
                  ROWS: tl.constexpr, COLS: tl.constexpr):
    """float32 (ROWS, COLS // 2) twice: W[rows, c0 + 2j] and W[rows, c0 + 2j + 1], columns wrapped modulo
    row_len (row_len % 64 == 0; c0 a multiple of COLS, COLS a power of two). Rows outside row_ok read
    row 0 and must be masked by the caller's use (their values are finite).

    Each packed byte is decoded in the layout it was loaded in: its two codes are looked up in the 16-entry
    table held in shared memory (tl.gather: one conflict-free LDS per element, the table loaded once and
    hoisted out of the caller's loop) and both scaled by the block's absmax. A tl.load(code_ptr + codes)
    gather here became, in the pipelined main loops, one 4-byte cp.async per element plus a shared-memory
    layout conversion of a tensor of 64-bit pointers."""
    HALF: tl.constexpr = COLS // 2
    rows = tl.where(row_ok, rows, 0).to(tl.int64)
    pairs = (c0 // 2 + tl.arange(0, HALF)) % (row_len // 2)
    byte = tl.load(b_ptr + rows[:, None] * (row_len // 2) + pairs[None, :]).to(tl.int32)
    table = tl.load(code_ptr + tl.arange(0, 16))
    hi = tl.reshape(tl.gather(table, tl.reshape(byte >> 4, (ROWS * HALF,)), 0), (ROWS, HALF))
    lo = tl.reshape(tl.gather(table, tl.reshape(byte & 15, (ROWS * HALF,)), 0), (ROWS, HALF))
    blocks_per_row = row_len // 64
    if COLS <= 64:
        # the tile's columns lie in one 64-element block (wrapped columns are masked by the caller)
        am = tl.load(absmax_ptr + rows * blocks_per_row + (c0 % row_len) // 64)[:, None]
    else:
        GROUPS: tl.constexpr = COLS // 64
        g = (c0 // 64 + tl.arange(0, GROUPS)) % blocks_per_row
        am = tl.load(absmax_ptr + rows[:, None] * blocks_per_row + g[None, :])
        am = tl.reshape(tl.broadcast_to(am[:, :, None], (ROWS, GROUPS, 32)), (ROWS, HALF))
    return hi * am, lo * am  # high nibble of byte j: column 2j, low nibble: 2j + 1


@triton.jit
def dequant_rows(b_ptr, absmax_ptr, code_ptr, rows, row_ok, c0, row_len,
                 ROWS: tl.constexpr, COLS: tl.constexpr):
    """float32 (ROWS, COLS): W[rows, c0 : c0 + COLS] in column order (dequant_pairs, interleaved)."""
    even, odd = dequant_pairs(b_ptr, absmax_ptr, code_ptr, rows, row_ok, c0, row_len, ROWS, COLS)
    return tl.interleave(even, odd)


class NF4B:
    """B as a 4-bit weight: packed codes, float32 absmax per 64 elements, the NF4 table, and B's logical
    shape (K, N) with element strides into the flat weight."""

    def __init__(self, packed, absmax, code, shape, strides):
        self.packed, self.absmax, self.code, self.shape, self.strides = packed, absmax, code, shape, strides

    def stride(self, i):
        return self.strides[i]


class NF4Operand:
    """A 4-bit weight W (N×K) as the kernels' B operand: .t() for x·Wᵀ (forward), .plain() for dy·W (dx)."""

    def __init__(self, packed, absmax, code, N, K):
        self.packed, self.absmax, self.code, self.shape = packed, absmax, code, (N, K)

    def t(self):
        N, K = self.shape
        return NF4B(self.packed, self.absmax, self.code, (K, N), (1, K))

    def plain(self):
        N, K = self.shape
        return NF4B(self.packed, self.absmax, self.code, (N, K), (K, 1))


def nf4_layout(b) -> int:
    """1: B = Wᵀ (W's rows are B's columns), 2: B = W; either when W's row length is a multiple of 64,
    so that each absmax block lies inside one row. 0: the per-element gather."""
    if b.stride(0) == 1 and b.stride(1) % 64 == 0:
        return 1
    if b.stride(1) == 1 and b.stride(0) % 64 == 0:
        return 2
    return 0


@triton.jit
def _dequantize_kernel(b_ptr, absmax_ptr, code_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    rk = k0 + tl.arange(0, BLOCK_K)
    w = dequant_rows(b_ptr, absmax_ptr, code_ptr, rn, rn < N, k0, K, BLOCK_N, BLOCK_K)
    tl.store(out_ptr + rn.to(tl.int64)[:, None] * K + rk[None, :], w.to(out_ptr.dtype.element_ty),
             mask=(rn[:, None] < N) & (rk[None, :] < K))


def dequantize(w: "NF4Operand", dtype) -> torch.Tensor:
    """W (N×K) in `dtype`, each element code·absmax rounded once, as the GEMM's tiles round it (K % 64 == 0)."""
    N, K = w.shape
    out = torch.empty((N, K), dtype=dtype, device=w.packed.device)
    block_n, block_k = (16, 64) if configs.interpreting() else (32, 256)
    grid = (configs.cdiv(N, block_n), configs.cdiv(K, block_k))
    _dequantize_kernel[grid](w.packed, w.absmax, w.code, out, N, K, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return out


@triton.jit
def _decode_absmax_kernel(q_ptr, code2_ptr, absmax2_ptr, out_ptr, offset, n,
                          BLOCKSIZE2: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    q = tl.load(q_ptr + i, mask=ok, other=0).to(tl.int32)
    scaled = tl.load(code2_ptr + q, mask=ok, other=0.0) * tl.load(absmax2_ptr + i // BLOCKSIZE2, mask=ok, other=0.0)
    tl.store(out_ptr + i, scaled + offset, mask=ok)


def decode_absmax(q, code2, absmax2, offset: float, blocksize2: int) -> torch.Tensor:
    """float32 absmax per block from double-quantised codes, code2[q]·absmax2[i // blocksize2] + offset, in one
    launch (the torch expression took seven); no FMA contraction, so the bits equal that expression's."""
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    n = q.numel()
    _decode_absmax_kernel[(configs.cdiv(n, 1024),)](q, code2, absmax2, out, float(offset), n, BLOCKSIZE2=blocksize2,
                                                   BLOCK=1024, num_warps=4, enable_fp_fusion=False)
    return out
