"""Split-K forward for few rows (decode, M <= 64): W streamed by many programs at once.

The GEMM of fused_linear gives each program a column block of y and all of K: at 16 rows and N = 4096 that
is 64-256 programs, too few to keep HBM busy. Here program (n, s) reduces K slice s for column block n:

    partial   P[s]  = x[:, Ks]·W[n, Ks]ᵀ     and, in column block 0 only, Q[s] = x[:, Ks]·A[:, Ks]ᵀ
    reduce    y     = Σ_s P[s] + (s·Σ_s Q[s])·Bᵀ + bias,   xa = Σ_s Q[s] (saved for backward)

Two launches instead of one, so the choice against the GEMM path is made per shape by measurement
(choose_path, measured.py); for a 16-bit or float32 W the "fused" form is a third candidate: one launch
whose last program per column block to finish does that block's reduce. No dropout (the GEMM path keeps it).
Partial sums go to separate slices and are added in a fixed order: results are deterministic.
"""
import torch
import triton
import triton.language as tl

from . import configs, measured, waves
from .nf4_tile import NF4Operand, dequant_pairs, dequant_rows

MAX_ROWS = 64
MAX_RANK = 128
GEMV_MAX_ROWS = 4  # the multiply-add partials (4-bit W) hold ROWS x BLOCK_N x BLOCK_K / 2 products per tile


@triton.jit
def _partial_sums(x_ptr, w_ptr, absmax_ptr, code_ptr, a_ptr, with_xa, pid_s, offs_n,
                  M, N, K, R, K_PER_SPLIT, stride_xm, stride_wn, stride_wk, stride_ar, stride_ak,
                  NF4: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """Split pid_s's share of K for the column block offs_n: x·Wᵀ (M×BLOCK_N) and, where with_xa, x·Aᵀ
    (M×BLOCK_R), both float32."""
    rm = tl.arange(0, BLOCK_M)
    rn = (offs_n % N).to(tl.int64)  # wrapped: loads stay in bounds, stores are masked
    rr = tl.arange(0, BLOCK_R)
    m_ok = rm < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    k_start = pid_s * K_PER_SPLIT
    for k0 in range(k_start, tl.minimum(K, k_start + K_PER_SPLIT), BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if NF4:
            # W's rows, K a multiple of 64; columns past K wrap to finite values that meet x's zeros
            w = dequant_rows(w_ptr, absmax_ptr, code_ptr, rn, rn >= 0, k0, K, BLOCK_N, BLOCK_K).to(x.dtype)
        else:
            w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :] * stride_wk, mask=k_ok[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
        if with_xa:
            a = tl.load(a_ptr + rr[:, None] * stride_ar + rk[None, :] * stride_ak,
                        mask=(rr[:, None] < R) & k_ok[None, :], other=0.0)
            xa = tl.dot(x, tl.trans(a.to(x.dtype)), xa, input_precision=DOT_PRECISION)
    return acc, xa


@triton.jit
def _splitk_partial_kernel(
    x_ptr, w_ptr, absmax_ptr, code_ptr, a_ptr, part_ptr, xa_part_ptr,
    M, N, K, R, K_PER_SPLIT, stride_xm, stride_wn, stride_wk, stride_ar, stride_ak,
    NF4: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc, xa = _partial_sums(x_ptr, w_ptr, absmax_ptr, code_ptr, a_ptr, pid_n == 0, pid_s, offs_n,
                            M, N, K, R, K_PER_SPLIT, stride_xm, stride_wn, stride_wk, stride_ar, stride_ak,
                            NF4, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R)
    _store_partials(part_ptr, xa_part_ptr, acc, xa, pid_n, pid_s, tl.arange(0, BLOCK_M), offs_n,
                    tl.arange(0, BLOCK_R), M, N, R)


@triton.jit
def _store_partials(part_ptr, xa_part_ptr, acc, xa, pid_n, pid_s, rm, offs_n, rr, M, N, R):
    """Slice pid_s of the partial sums: x·Wᵀ for this column block, and x·Aᵀ from column block 0."""
    m_ok = rm < M
    tl.store(part_ptr + (pid_s * M + rm[:, None]).to(tl.int64) * N + offs_n[None, :], acc,
             mask=m_ok[:, None] & (offs_n[None, :] < N))
    if pid_n == 0:
        tl.store(xa_part_ptr + (pid_s * M + rm[:, None]) * R + rr[None, :], xa, mask=m_ok[:, None] & (rr[None, :] < R))


@triton.jit
def _nf4_gemv_partial_kernel(
    x_ptr, w_ptr, absmax_ptr, code_ptr, a_ptr, part_ptr, xa_part_ptr,
    M, N, K, R, K_PER_SPLIT, stride_xm, stride_ar, stride_ak,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # The partial sums of _splitk_partial_kernel for a 4-bit W and at most 4 rows, by multiply-adds instead of
    # a tensor-core product padded to 16 rows: each packed byte's two codes meet x's even and odd columns, so
    # the dequantised tile is never interleaved nor moved into an operand layout. W rounds to x's dtype, as
    # the tensor-core paths round it; products and sums are float32.
    HALF: tl.constexpr = BLOCK_K // 2
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rm = tl.arange(0, ROWS)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = (offs_n % N).to(tl.int64)  # wrapped: loads stay in bounds, stores are masked
    rj = tl.arange(0, HALF)
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    m_ok = rm < M
    # element-wise sums over the K loop, reduced across lanes once after it (a reduction per step cost
    # hundreds of shuffles and barriers per tile)
    acc = tl.zeros((ROWS, BLOCK_N, HALF), dtype=tl.float32)
    xa = tl.zeros((ROWS, BLOCK_R, BLOCK_K), dtype=tl.float32)
    k_start = pid_s * K_PER_SPLIT
    for k0 in range(k_start, tl.minimum(K, k_start + K_PER_SPLIT), BLOCK_K):
        even, odd = dequant_pairs(w_ptr, absmax_ptr, code_ptr, rn, rn >= 0, k0, K, BLOCK_N, BLOCK_K)
        ke = k0 + 2 * rj
        ok = m_ok[:, None] & (ke[None, :] < K)  # columns past K wrapped to finite values: x is 0 there
        x_ptrs = x_ptr + rm[:, None] * stride_xm + ke[None, :]
        x_e = tl.load(x_ptrs, mask=ok, other=0.0)
        x_o = tl.load(x_ptrs + 1, mask=ok, other=0.0)
        even = even.to(x_e.dtype).to(tl.float32)
        odd = odd.to(x_e.dtype).to(tl.float32)
        acc += even[None, :, :] * x_e.to(tl.float32)[:, None, :] + odd[None, :, :] * x_o.to(tl.float32)[:, None, :]
        if pid_n == 0:
            k_ok = (k0 + rk) < K
            x = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :], mask=m_ok[:, None] & k_ok[None, :],
                        other=0.0)
            a = tl.load(a_ptr + rr[:, None] * stride_ar + (k0 + rk)[None, :] * stride_ak,
                        mask=(rr[:, None] < R) & k_ok[None, :], other=0.0)
            a = a.to(x.dtype).to(tl.float32)
            xa += x.to(tl.float32)[:, None, :] * a[None, :, :]
    _store_partials(part_ptr, xa_part_ptr, tl.sum(acc, axis=2), tl.sum(xa, axis=2), pid_n, pid_s, rm, offs_n, rr,
                    M, N, R)


@triton.jit
def _reduce_columns(part_ptr, xa_part_ptr, b_ptr, bias_ptr, scale_ptr, y_ptr, xa_ptr, pid_n, write_xa,
                    M, N, R, SPLIT, stride_bn, stride_br, stride_ym, scale,
                    HAS_BIAS: tl.constexpr, SCALE_FROM_PTR: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """y's column block pid_n: its SPLIT partial sums and x·Aᵀ's (xa_part: SPLIT slices of M×R) added in
    order, then (s·xa)·Bᵀ and the bias; xa itself stored where write_xa. Loads bypass L1 (.cg): the fused
    kernel reads partials other programs of the same launch wrote."""
    rm = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    m_ok = rm < M
    n_ok = offs_n < N
    r_ok = rr < R
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for s in range(0, SPLIT):
        acc += tl.load(part_ptr + (s * M + rm[:, None]).to(tl.int64) * N + offs_n[None, :],
                       mask=m_ok[:, None] & n_ok[None, :], other=0.0, cache_modifier=".cg")
        xa += tl.load(xa_part_ptr + (s * M + rm[:, None]) * R + rr[None, :], mask=m_ok[:, None] & r_ok[None, :],
                      other=0.0, cache_modifier=".cg")
    if write_xa:
        tl.store(xa_ptr + rm[:, None] * R + rr[None, :], xa, mask=m_ok[:, None] & r_ok[None, :])
    if SCALE_FROM_PTR:
        s_val = tl.load(scale_ptr).to(tl.float32)
    else:
        s_val = scale
    DT: tl.constexpr = y_ptr.dtype.element_ty
    b = tl.load(b_ptr + offs_n[:, None] * stride_bn + rr[None, :] * stride_br, mask=n_ok[:, None] & r_ok[None, :],
                other=0.0)
    acc = tl.dot((xa * s_val).to(DT), tl.trans(b.to(DT)), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + offs_n[None, :], acc.to(DT), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _splitk_reduce_kernel(
    part_ptr, xa_part_ptr, b_ptr, bias_ptr, scale_ptr, y_ptr, xa_ptr,
    M, N, R, SPLIT, stride_bn, stride_br, stride_ym, scale,
    HAS_BIAS: tl.constexpr, SCALE_FROM_PTR: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_n = tl.program_id(0)
    _reduce_columns(part_ptr, xa_part_ptr, b_ptr, bias_ptr, scale_ptr, y_ptr, xa_ptr, pid_n, pid_n == 0,
                    M, N, R, SPLIT, stride_bn, stride_br, stride_ym, scale, HAS_BIAS, SCALE_FROM_PTR, DOT_PRECISION,
                    BLOCK_M, BLOCK_N, BLOCK_R)


@triton.jit
def _splitk_fused_kernel(
    x_ptr, w_ptr, a_ptr, part_ptr, xa_part_ptr, count_ptr, b_ptr, bias_ptr, scale_ptr, y_ptr, xa_ptr,
    M, N, K, R, K_PER_SPLIT, SPLIT, stride_xm, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_ym, scale,
    HAS_BIAS: tl.constexpr, SCALE_FROM_PTR: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # The partials of _splitk_partial_kernel (16-bit or float32 W), then the reduce in the same launch: the
    # last program of each column block to finish (a counter per block, zeroed by the caller) adds the
    # slices in order. Every program also forms its slice of x·Aᵀ, so a column block's reduce depends on
    # its own programs only (no wait on column block 0).
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    m_ok = rm < M
    acc, xa = _partial_sums(x_ptr, w_ptr, w_ptr, w_ptr, a_ptr, True, pid_s, offs_n,
                            M, N, K, R, K_PER_SPLIT, stride_xm, stride_wn, stride_wk, stride_ar, stride_ak,
                            False, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R)
    xa_col = xa_part_ptr + pid_n * SPLIT * M * R  # this column block's SPLIT slices of x·Aᵀ
    tl.store(part_ptr + (pid_s * M + rm[:, None]).to(tl.int64) * N + offs_n[None, :], acc,
             mask=m_ok[:, None] & (offs_n[None, :] < N))
    tl.store(xa_col + (pid_s * M + rm[:, None]) * R + rr[None, :], xa, mask=m_ok[:, None] & (rr[None, :] < R))
    tl.debug_barrier()  # every thread's partials are stored before the count (release, GPU scope)
    done = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
    if done == SPLIT - 1:
        _reduce_columns(part_ptr, xa_col, b_ptr, bias_ptr, scale_ptr, y_ptr, xa_ptr, pid_n, pid_n == 0,
                        M, N, R, SPLIT, stride_bn, stride_br, stride_ym, scale, HAS_BIAS, SCALE_FROM_PTR,
                        DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_R)


def applies(x2d, weight, lora_A, dropout_on: bool) -> bool:
    """Shapes this path serves: few rows, no dropout, x rows contiguous, rank up to MAX_RANK, and for a 4-bit
    W a row length that is a multiple of 64 (whole absmax blocks per row)."""
    M, K = x2d.shape
    if not (0 < M <= MAX_ROWS) or K == 0 or weight.shape[0] == 0 or dropout_on:
        return False
    if lora_A.shape[0] > MAX_RANK or x2d.stride(1) != 1:
        return False
    return K % 64 == 0 if isinstance(weight, NF4Operand) else True


def gemv_applies(x2d, weight) -> bool:
    """The multiply-add partials serve a 4-bit W (whole absmax blocks per row) and at most GEMV_MAX_ROWS rows."""
    return isinstance(weight, NF4Operand) and x2d.shape[0] <= GEMV_MAX_ROWS


def forward(x2d, weight, lora_A, lora_B, bias, scale, scale_t, precision, gemv=False, fused=False):
    """(y, xa) as fused_linear.forward returns them, for the shapes `applies` accepts; gemv=True (where
    gemv_applies) makes the partial sums by multiply-adds instead of tensor-core products; fused=True (a
    16-bit or float32 W) adds them up in the same launch (_splitk_fused_kernel) instead of a second one."""
    M, K = x2d.shape
    N, R = lora_B.shape
    nf4 = isinstance(weight, NF4Operand)
    gemv = gemv and gemv_applies(x2d, weight)
    fused = fused and not nf4 and not gemv
    block_m, block_r = max(16, configs.next_pow2(M)), max(16, configs.next_pow2(R))
    if configs.interpreting():
        block_n, block_k = 16, 64
    elif gemv:
        # 32 x 128 / 32 x 64 / 32 x 64 tiles for 1 / 2 / 4 rows: 128, 115 and 159 registers (sm_90a, no
        # spills), so 3-4 programs per SM; wider tiles reached 220-255 registers
        block_n, block_k = 32, max(64, 128 // configs.next_pow2(M))
    else:
        # float32 without TF32 ("ieee") multiplies on the FMA units, unrolled: 128-k steps spilled there
        block_n, block_k = 64, (32 if precision == "ieee" else 128)
    n_blocks = configs.cdiv(N, block_n)
    # Whole waves of resident programs (waves.per_unit), but partial sums (split·M·N floats, written and read
    # once) kept under an eighth of W's bytes.
    w_bytes = 0.5 if nf4 else weight.element_size()
    max_split = max(1, min(configs.cdiv(K, block_k), int(K * w_bytes) // (32 * M)))
    variant = ("splitk", nf4, gemv, fused, x2d.dtype, lora_A.dtype, block_m, block_k, block_r, precision)
    y = torch.empty((M, N), device=x2d.device, dtype=x2d.dtype)
    xa = torch.empty((M, R), device=x2d.device, dtype=torch.float32)
    from_ptr = scale_t is not None
    bias_arg, scale_arg, scale_f = bias if bias is not None else x2d, scale_t if from_ptr else x2d, \
        1.0 if from_ptr else float(scale)
    dev = x2d.device
    if nf4:
        w, absmax, code, swn, swk = weight.packed, weight.absmax, weight.code, K, 1
    else:
        w, absmax, code, swn, swk = weight, x2d, x2d, weight.stride(0), weight.stride(1)

    def partials(grid, split):
        k_per_split = configs.cdiv(configs.cdiv(K, split), block_k) * block_k
        split = configs.cdiv(K, k_per_split)
        part = torch.empty((split, M, N), device=dev, dtype=torch.float32)
        xa_part = torch.empty(((n_blocks if fused else 1) * split, M, R), device=dev, dtype=torch.float32)
        if fused:
            counts = torch.zeros((n_blocks,), device=dev, dtype=torch.int32)
            kernel = _splitk_fused_kernel[grid or (n_blocks, split)](
                x2d, w, lora_A, part, xa_part, counts, lora_B, bias_arg, scale_arg, y, xa,
                M, N, K, R, k_per_split, split, x2d.stride(0), swn, swk, lora_A.stride(0), lora_A.stride(1),
                lora_B.stride(0), lora_B.stride(1), y.stride(0), scale_f,
                HAS_BIAS=bias is not None, SCALE_FROM_PTR=from_ptr, DOT_PRECISION=precision,
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r, num_warps=4, num_stages=3)
        elif gemv:
            kernel = _nf4_gemv_partial_kernel[grid or (n_blocks, split)](
                x2d, w, absmax, code, lora_A, part, xa_part, M, N, K, R, k_per_split, x2d.stride(0),
                lora_A.stride(0), lora_A.stride(1), ROWS=configs.next_pow2(M), BLOCK_N=block_n, BLOCK_K=block_k,
                BLOCK_R=block_r, num_warps=4, num_stages=3)
        else:
            kernel = _splitk_partial_kernel[grid or (n_blocks, split)](
                x2d, w, absmax, code, lora_A, part, xa_part, M, N, K, R, k_per_split, x2d.stride(0), swn, swk,
                lora_A.stride(0), lora_A.stride(1), NF4=nf4, DOT_PRECISION=precision,
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r, num_warps=4, num_stages=3)
        return kernel, part, xa_part, split
    if x2d.is_cuda and not waves.known(variant):
        # One program first: the kernel is compiled and loaded, so its residency is known before the split
        # is chosen, and every call of this variant splits K alike (the same summation order, the same bits).
        kernel, *_ = partials((1, 1), max_split)
        waves.note(kernel, x2d, variant)
    _, part, xa_part, split = partials(None, waves.per_unit(n_blocks, max_split, x2d, variant))
    if not fused:
        # 32 columns and 8 warps per program: 2.2 / 2.2 / 2.8 µs at 8 / 16 / 64 rows × 4096 on an H200, against
        # 2.4 / 2.5 / 3.7 for the partials' 64 columns and 4 warps (bench/splitk_sweep.py)
        reduce_n = 16 if configs.interpreting() else 32
        _splitk_reduce_kernel[(configs.cdiv(N, reduce_n),)](
            part, xa_part, lora_B, bias_arg, scale_arg, y, xa, M, N, R, split, lora_B.stride(0), lora_B.stride(1),
            y.stride(0), scale_f, HAS_BIAS=bias is not None, SCALE_FROM_PTR=from_ptr, DOT_PRECISION=precision,
            BLOCK_M=block_m, BLOCK_N=reduce_n, BLOCK_R=block_r, num_warps=8)
    return y, xa


def choose_path(key, gemm, splitk, gemv=None, fused=None) -> str:
    """'gemm', 'splitk', 'gemv' or 'fused' (those given) for this shape key, by GPU time (measured.choose;
    LORA_KERNELS_DECODE=gemm|splitk|gemv|fused forces one)."""
    options = {"gemm": gemm, "splitk": splitk, **({"gemv": gemv} if gemv is not None else {}),
               **({"fused": fused} if fused is not None else {})}
    return measured.choose(("decode",) + tuple(key), options, "gemm", "LORA_KERNELS_DECODE", by="gpu")
