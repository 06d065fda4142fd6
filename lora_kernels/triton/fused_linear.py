"""Triton kernels of the fused LoRA linear: one GEMM with a low-rank K step, and two skinny GEMMs.

    forward   T  = dropout(x)·Aᵀ                         skinny_rank   (reads x once)
              y  = x·Wᵀ + (s·T)·Bᵀ + bias                gemm_lowrank  (y written once)
    backward  G  = s·dy·B                                skinny_rank   (reads dy once)
              dB = s·dyᵀ·T  (+ dbias = Σ dy)             reduce_rows   (reads dy once)
              dA = Gᵀ·dropout(x)                         reduce_rows   (reads x once)
              dx = dy·W + mask ⊙ (G·A)/(1-p)             gemm_lowrank
Partial sums over row-splits are written to separate slices and summed afterwards (no atomics),
so every result is deterministic.
"""
import functools

import torch
import triton
import triton.language as tl

from . import configs, splitk
from .dropout import dropped, keep_mask, load_seed, mask_args as dropout_mask_args
from .measured import choose
from .tiles import lowrank_dot, output_tile
from .nf4_tile import NF4B, NF4Operand, dequant_rows, nf4_layout


@triton.jit
def _next_slot(slot, cur):
    """The smallest slot id in the tile above cur (2**30 when none): walks only the slots present."""
    return tl.min(tl.where(slot > cur, slot, 1 << 30), axis=0)


@triton.jit
def _gemm_lowrank_kernel(
    a_ptr, b_ptr, c_ptr, l_ptr, r_ptr, bias_ptr, scale_ptr, seed_ptr, perm_ptr, slot_ptr, absmax_ptr, code_ptr,
    fa_ptr, M, N, K, R, M_BUCKET,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    stride_lm, stride_lr, stride_rr, stride_rn, stride_rs, stride_fak, stride_far,
    scale, threshold, keep_scale,
    HAS_BIAS: tl.constexpr, SCALE_FROM_PTR: tl.constexpr, LOWRANK_DROPOUT: tl.constexpr, MULTI: tl.constexpr,
    NF4: tl.constexpr, NF4_LAYOUT: tl.constexpr, FOLD_XA: tl.constexpr, EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C = A·B + (s·L)·Rt (+ bias); with LOWRANK_DROPOUT the low-rank part is masked per (row, col).

    MULTI (one adapter per row): tile rows are positions in slot-sorted order; perm maps them to rows
    of A and C, slot gives each position's adapter (-1: none), Rt is stacked per slot (stride_rs) and
    scale_ptr holds one scaling per slot. Each slot present in the tile adds one masked low-rank step.

    FOLD_XA (small M, no dropout): L = A_main·FA is accumulated in the main loop from the A tiles already
    loaded (FA = Aᵀ of the adapter, K×R), written to l_ptr by the first column of programs (it is saved for
    backward), then used for the low-rank step: one launch instead of a separate x·Aᵀ kernel.

    NF4: B is a 4-bit weight dequantised tile by tile in the main loop: b_ptr holds two codes per byte (high
    nibble first), stride_bk/stride_bn are element strides into the flat weight, absmax_ptr one float32
    per 64-element block, code_ptr the 16 NF4 values. NF4_LAYOUT 1 (B = Wᵀ) and 2 (B = W) dequantise whole
    rows of W with vector loads (row length a multiple of 64); 0 gathers byte and absmax per element.
    """
    pid = tl.program_id(0)
    pid_m, pid_n, offs_m, offs_n, rm, rn = output_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    if MULTI:
        src = tl.load(perm_ptr + rm).to(tl.int64)
    else:
        src = rm
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + src[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn
    # The low-rank term goes first: the accumulator then holds nothing else, so the dropout mask can be
    # applied in place (one accumulator: no second BLOCK_M×BLOCK_N tile of registers, no spills).
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    DT: tl.constexpr = a_ptr.dtype.element_ty
    rr = tl.arange(0, BLOCK_R)
    if SCALE_FROM_PTR:
        s = tl.load(scale_ptr).to(tl.float32)
    else:
        s = scale
    if FOLD_XA:
        lacc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        fa_ptrs = fa_ptr + rk[:, None] * stride_fak + rr[None, :] * stride_far
    elif MULTI:
        slot = tl.where(offs_m < M, tl.load(slot_ptr + rm), -1)
        cur = _next_slot(slot, -1)
        last = tl.max(slot, axis=0)
        while cur <= last:
            row_scale = tl.where(slot == cur, tl.load(scale_ptr + cur).to(tl.float32), 0.0)
            acc = lowrank_dot(acc, l_ptr, r_ptr + cur.to(tl.int64) * stride_rs, rm, rn, R, stride_lm, stride_lr,
                               stride_rr, stride_rn, row_scale, DT, BLOCK_R, DOT_PRECISION)
            cur = _next_slot(slot, cur)
    else:
        row_scale = tl.full((BLOCK_M,), 1.0, tl.float32) * s
        acc = lowrank_dot(acc, l_ptr, r_ptr, rm, rn, R, stride_lm, stride_lr, stride_rr, stride_rn, row_scale,
                           DT, BLOCK_R, DOT_PRECISION)
        if LOWRANK_DROPOUT:
            # acc holds only the low-rank term here, so the mask touches nothing else
            keep = keep_mask(load_seed(seed_ptr), offs_m, offs_n, threshold)
            acc = tl.where(keep, acc * keep_scale, 0.0)

    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
        else:
            a = tl.load(a_ptrs, mask=rk[None, :] < K - k * BLOCK_K, other=0.0)
        if NF4 and NF4_LAYOUT == 1:
            # B = Wᵀ: the tile's columns are rows of W, its K range a run of packed bytes in each
            b = tl.trans(dequant_rows(b_ptr, absmax_ptr, code_ptr, rn, rn >= 0, k * BLOCK_K, stride_bn,
                                      BLOCK_N, BLOCK_K)).to(DT)
        elif NF4 and NF4_LAYOUT == 2:
            # B = W (dx): the tile's rows are rows of W
            kk = k * BLOCK_K + rk
            b = dequant_rows(b_ptr, absmax_ptr, code_ptr, kk, kk < K, pid_n * BLOCK_N, stride_bk,
                             BLOCK_K, BLOCK_N).to(DT)
        elif NF4:
            kk = k * BLOCK_K + rk
            flat = kk.to(tl.int64)[:, None] * stride_bk + rn[None, :] * stride_bn
            byte = tl.load(b_ptr + flat // 2, mask=kk[:, None] < K, other=0)
            nib = tl.where(flat % 2 == 0, byte >> 4, byte & 15).to(tl.int32)
            b = (tl.load(code_ptr + nib) * tl.load(absmax_ptr + flat // 64, mask=kk[:, None] < K, other=0.0)).to(DT)
        elif EVEN_K:
            b = tl.load(b_ptrs)
        else:
            b = tl.load(b_ptrs, mask=rk[:, None] < K - k * BLOCK_K, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if FOLD_XA:
            fa = tl.load(fa_ptrs, mask=((k * BLOCK_K + rk)[:, None] < K) & (rr[None, :] < R), other=0.0)
            lacc = tl.dot(a, fa.to(DT), lacc, input_precision=DOT_PRECISION)
            fa_ptrs += BLOCK_K * stride_fak
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if FOLD_XA:
        # padded rank columns are 0·x: NaN where x holds Inf, so clear them before they meet B's zero rows
        lacc = tl.where(rr[None, :] < R, lacc, 0.0)
        if pid_n == 0:
            l_ptrs = l_ptr + offs_m.to(tl.int64)[:, None] * stride_lm + rr[None, :] * stride_lr
            tl.store(l_ptrs, lacc, mask=(offs_m[:, None] < M) & (rr[None, :] < R))
        rt = tl.load(r_ptr + rr[:, None] * stride_rr + rn[None, :] * stride_rn, mask=rr[:, None] < R, other=0.0)
        acc = tl.dot((lacc * s).to(DT), rt.to(DT), acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn).to(tl.float32)[None, :]
    dst = src if MULTI else offs_m.to(tl.int64)
    c_ptrs = c_ptr + dst[:, None] * stride_cm + offs_n.to(tl.int64)[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


_gemm_lowrank_tuned = triton.autotune(
    configs=configs.GEMM_CONFIGS + configs.FMA_GEMM_CONFIGS,
    # The flags change the work per tile (and its shared memory), so each variant tunes on its own.
    key=["M_BUCKET", "N", "K", "R", "HAS_BIAS", "LOWRANK_DROPOUT", "MULTI", "NF4", "NF4_LAYOUT", "FOLD_XA",
         "DOT_PRECISION", "BLOCK_R"],
    prune_configs_by={"early_config_prune": configs.prune_gemm_configs}, do_bench=configs.tune_bench,
)(triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})(_gemm_lowrank_kernel))


@triton.jit
def _skinny_rank_kernel(
    x_ptr, rt_ptr, out_ptr, scale_ptr, seed_ptr, perm_ptr, slot_ptr,
    M, K, R, K_PER_SPLIT,
    stride_xm, stride_xk, stride_rk, stride_rr, stride_rs, stride_os, stride_om, stride_or,
    scale, threshold, keep_scale,
    SCALE_FROM_PTR: tl.constexpr, DROPOUT: tl.constexpr, MULTI: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[split] = s · (mask ⊙ X)[:, split's K range] · Rt[split's K range, :]   (M×R, float32).

    MULTI: rows are slot-sorted positions (perm maps them to rows of X) and Rt is stacked per slot.
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rm = (offs_m % M).to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    k_start = pid_s * K_PER_SPLIT
    k_end = min(K, k_start + K_PER_SPLIT)
    if DROPOUT:
        seed = load_seed(seed_ptr)
    if MULTI:
        src = tl.load(perm_ptr + rm).to(tl.int64)
        slot = tl.where(offs_m < M, tl.load(slot_ptr + rm), -1)
        first = _next_slot(slot, -1)
        last = tl.max(slot, axis=0)
    else:
        src = rm
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + src[:, None] * stride_xm + rk[None, :] * stride_xk, mask=rk[None, :] < k_end, other=0.0)
        if DROPOUT:
            keep = keep_mask(seed, offs_m, rk, threshold)
            x = dropped(x, keep, keep_scale)
        rt_ptrs = rt_ptr + rk[:, None] * stride_rk + rr[None, :] * stride_rr
        rt_mask = (rk[:, None] < k_end) & (rr[None, :] < R)
        if MULTI:
            cur = first
            while cur <= last:
                rt = tl.load(rt_ptrs + cur.to(tl.int64) * stride_rs, mask=rt_mask, other=0.0)
                x_sel = tl.where((slot == cur)[:, None], x, 0.0).to(x.dtype)
                acc = tl.dot(x_sel, rt.to(x.dtype), acc, input_precision=DOT_PRECISION)
                cur = _next_slot(slot, cur)
        else:
            rt = tl.load(rt_ptrs, mask=rt_mask, other=0.0)
            acc = tl.dot(x, rt.to(x.dtype), acc, input_precision=DOT_PRECISION)
    if SCALE_FROM_PTR:
        acc *= tl.load(scale_ptr).to(tl.float32)
    else:
        acc *= scale
    o_ptrs = out_ptr + pid_s * stride_os + offs_m.to(tl.int64)[:, None] * stride_om + rr[None, :] * stride_or
    tl.store(o_ptrs, acc, mask=(offs_m[:, None] < M) & (rr[None, :] < R))


@triton.jit
def _reduce_rows_kernel(
    x_ptr, s_ptr, out_ptr, colsum_ptr, scale_ptr, seed_ptr,
    M, C, R, M_PER_SPLIT,
    stride_xm, stride_xc, stride_sm, stride_sr, stride_os, stride_oc, stride_or, stride_cs,
    scale, threshold, keep_scale,
    SCALE_FROM_PTR: tl.constexpr, DROPOUT: tl.constexpr, COLSUM: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[split] = s · (mask ⊙ X)ᵀ · S over the split's rows (C×R, float32); optionally Σ_rows X."""
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    rc = (offs_c % C).to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    m_start = pid_s * M_PER_SPLIT
    m_end = min(M, m_start + M_PER_SPLIT)
    if DROPOUT:
        seed = load_seed(seed_ptr)
    acc = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
    col_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        row_ok = rm < m_end
        x = tl.load(x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rc[None, :] * stride_xc,
                    mask=row_ok[:, None], other=0.0)
        if COLSUM:
            col_acc += tl.sum(x.to(tl.float32), axis=0)
        if DROPOUT:
            keep = keep_mask(seed, rm, offs_c, threshold)
            x = dropped(x, keep, keep_scale)
        st = tl.load(s_ptr + rm.to(tl.int64)[:, None] * stride_sm + rr[None, :] * stride_sr,
                     mask=row_ok[:, None] & (rr[None, :] < R), other=0.0)
        acc = tl.dot(tl.trans(x), st.to(x.dtype), acc, input_precision=DOT_PRECISION)
    if SCALE_FROM_PTR:
        acc *= tl.load(scale_ptr).to(tl.float32)
    else:
        acc *= scale
    c_ok = offs_c < C
    o_ptrs = out_ptr + pid_s * stride_os + offs_c.to(tl.int64)[:, None] * stride_oc + rr[None, :] * stride_or
    tl.store(o_ptrs, acc, mask=c_ok[:, None] & (rr[None, :] < R))
    if COLSUM:
        tl.store(colsum_ptr + pid_s * stride_cs + offs_c, col_acc, mask=c_ok)


# ----------------------------------------------------------------------------------------------
# Launchers


def _sms(t: torch.Tensor) -> int:
    return configs.sm_count(t)


def _precision(dtype, allow_tf32: bool) -> str:
    return "tf32" if (dtype != torch.float32 or allow_tf32) else "ieee"


def _block_r(r: int) -> int:
    return min(max(16, configs.next_pow2(r)), 64)


class Dropout:
    """Arguments that reproduce one dropout mask: the seed tensor and p."""

    def __init__(self, seed, p: float):
        self.on = seed is not None and p > 0.0
        self.seed = seed
        # cached per p: five of these are built per training step
        self.threshold, self.keep_scale = dropout_mask_args(p) if self.on else (0, 1.0)


NO_DROPOUT = Dropout(None, 0.0)


def _scale_args(scale, scale_t, like):
    if scale_t is not None:
        return 1.0, scale_t, True
    return float(scale), like, False


class Multi:
    """One adapter per row: slot-sorted order (perm), each position's slot, per-slot scalings."""

    def __init__(self, perm, slots, scalings):
        self.perm, self.slots, self.scalings = perm, slots, scalings


def gemm_lowrank(a, b, low_l, low_r, out, *, bias=None, scale=1.0, scale_t=None, dropout=None, multi=None,
                 fold_a=None, allow_tf32=False):
    """out (M×N) = a (M×K) · b (K×N) + (s·low_l) (M×R) · low_r (R×N) + bias; b and low_r may be strided views.

    With multi, low_r is (slots, R, N) and low_l holds rows in the slot-sorted order of multi.perm.
    b may be an NF4B (a 4-bit weight dequantised inside the main loop). With fold_a (K×R, the adapter's Aᵀ),
    low_l is an output: the kernel computes a·fold_a in its main loop, writes it there and uses it."""
    M, K = a.shape
    N = b.shape[1]
    nf4 = isinstance(b, NF4B)
    b_ptr, absmax, code = (b.packed, b.absmax, b.code) if nf4 else (b, a, a)
    R = low_l.shape[1]
    dropout = dropout or NO_DROPOUT
    if multi is not None:
        s, s_ptr, s_from_ptr = 1.0, multi.scalings, True
        perm, slots, rs = multi.perm, multi.slots, low_r.stride(0)
        r2 = low_r[0]
    else:
        s, s_ptr, s_from_ptr = _scale_args(scale, scale_t, a)
        perm, slots, rs, r2 = a, a, 0, low_r
    args = (a, b_ptr, out, low_l, low_r, bias if bias is not None else a, s_ptr,
            dropout.seed if dropout.on else a, perm, slots, absmax, code, fold_a if fold_a is not None else a,
            M, N, K, R, configs.m_bucket(M),
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
            low_l.stride(0), low_l.stride(1), r2.stride(0), r2.stride(1), rs,
            fold_a.stride(0) if fold_a is not None else 0, fold_a.stride(1) if fold_a is not None else 0,
            s, dropout.threshold, dropout.keep_scale)
    fold = fold_a is not None
    flags = dict(HAS_BIAS=bias is not None, SCALE_FROM_PTR=s_from_ptr, LOWRANK_DROPOUT=dropout.on,
                 MULTI=multi is not None, NF4=nf4, NF4_LAYOUT=nf4_layout(b) if nf4 else 0, FOLD_XA=fold,
                 DOT_PRECISION=_precision(a.dtype, allow_tf32),
                 BLOCK_R=max(16, configs.next_pow2(R)) if fold else _block_r(R))
    if M == 0 or N == 0:
        return out
    tma_gemm = _tma_module() if multi is None and not nf4 and not fold else None
    if tma_gemm is not None and tma_gemm.eligible(a, b, out):
        def by_tma():
            return tma_gemm.launch(a, b, out, low_l, low_r, bias, s, s_ptr, s_from_ptr, dropout,
                                   flags["DOT_PRECISION"], flags["BLOCK_R"])
        key = ("gemm feed", a.device, configs.m_bucket(M), N, K, R, a.dtype, low_l.dtype, low_r.dtype,
               b.stride(0) == 1, *flags.values())
        if choose(key, {"pointers": lambda: _launch_gemm(args, flags, a, b_ptr, out, low_l, low_r),
                        "tma": by_tma}, "pointers", "LORA_KERNELS_GEMM", by="gpu") == "tma":
            return by_tma()
    return _launch_gemm(args, flags, a, b_ptr, out, low_l, low_r)


@functools.lru_cache(maxsize=None)
def _tma_module():
    """tma_gemm, or None where this Triton has no host-side tensor descriptors (the pointer-fed kernel serves)."""
    try:
        from . import tma_gemm
        return tma_gemm
    except ImportError:
        return None


def _launch_gemm(args, flags, a, b_ptr, out, low_l, low_r):
    """The pointer-fed kernel: every variant (4-bit W, mixed adapters, folded x·Aᵀ), any strides."""
    M, N, K, R = args[13:17]
    if configs.interpreting():
        cfg = configs.INTERPRET_GEMM
        grid = (configs.cdiv(M, cfg["BLOCK_M"]) * configs.cdiv(N, cfg["BLOCK_N"]),)
        _gemm_lowrank_kernel[grid](*args, EVEN_K=K % cfg["BLOCK_K"] == 0, **flags, **cfg)
    else:
        def grid(meta):
            return (configs.cdiv(M, meta["BLOCK_M"]) * configs.cdiv(N, meta["BLOCK_N"]),)
        key = (a.device.index, configs.m_bucket(M), N, K, R, a.dtype, b_ptr.dtype, out.dtype, low_l.dtype,
               low_r.dtype, *flags.values())
        cfg = _tuned_configs.get(key)
        if cfg is None:
            _gemm_lowrank_tuned[grid](*args, **flags)
            _tuned_configs[key] = _gemm_lowrank_tuned.best_config
        else:
            # The autotuner's per-call bookkeeping (its key over every argument, the heuristics layer)
            # costs host time on each launch; once a shape is tuned, launch the chosen tile directly.
            _gemm_lowrank_kernel[grid](*args, **flags, EVEN_K=K % cfg.kwargs["BLOCK_K"] == 0, **cfg.all_kwargs())
    return out


_tuned_configs: dict = {}


def skinny_rank(x, rt, *, scale=1.0, scale_t=None, dropout=None, multi=None, allow_tf32=False):
    """s · (mask ⊙ x) · rt → (M×R) float32; x (M×K), rt (K×R) may be a strided view.

    With multi, rt is (slots, K, R) and the result's rows are in the slot-sorted order of multi.perm."""
    M, K = x.shape
    R = rt.shape[-1]
    dropout = dropout or NO_DROPOUT
    if M == 0 or K == 0:
        return torch.zeros((M, R), device=x.device, dtype=torch.float32)
    block_r = max(16, configs.next_pow2(R))
    block_m = 16 if configs.interpreting() else (64 if M > 64 else 16)
    block_k = 32 if (configs.interpreting() or block_r > 64) else 64
    m_blocks = configs.cdiv(M, block_m)
    split = configs.skinny_split(K, m_blocks, _sms(x))
    k_per_split = configs.cdiv(configs.cdiv(K, split), block_k) * block_k
    split = configs.cdiv(K, k_per_split)
    part = torch.empty((split, M, R), device=x.device, dtype=torch.float32)
    s, s_ptr, s_from_ptr = _scale_args(scale, scale_t, x)
    perm, slots, rs, r2 = (multi.perm, multi.slots, rt.stride(0), rt[0]) if multi is not None else (x, x, 0, rt)
    _skinny_rank_kernel[(m_blocks, split)](
        x, rt, part, s_ptr, dropout.seed if dropout.on else x, perm, slots,
        M, K, R, k_per_split,
        x.stride(0), x.stride(1), r2.stride(0), r2.stride(1), rs, part.stride(0), part.stride(1), part.stride(2),
        s, dropout.threshold, dropout.keep_scale,
        SCALE_FROM_PTR=s_from_ptr, DROPOUT=dropout.on, MULTI=multi is not None,
        DOT_PRECISION=_precision(x.dtype, allow_tf32),
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r, num_warps=4 if block_r <= 64 else 8,
    )
    return part[0] if split == 1 else part.sum(0)


def reduce_rows(x, s_mat, *, scale=1.0, scale_t=None, dropout=None, colsum=False, allow_tf32=False):
    """s · (mask ⊙ x)ᵀ · s_mat → (C×R) float32, and Σ_rows x (C,) float32 when colsum; x (M×C), s_mat (M×R)."""
    M, C = x.shape
    R = s_mat.shape[1]
    dropout = dropout or NO_DROPOUT
    if M == 0 or C == 0:
        zeros = torch.zeros((C, R), device=x.device, dtype=torch.float32)
        return zeros, (torch.zeros((C,), device=x.device, dtype=torch.float32) if colsum else None)
    block_r = max(16, configs.next_pow2(R))
    block_c = 32 if (configs.interpreting() or block_r > 64) else 64
    block_m = 16 if configs.interpreting() else 64
    c_blocks = configs.cdiv(C, block_c)
    split = configs.skinny_split(M, c_blocks, _sms(x))
    m_per_split = configs.cdiv(configs.cdiv(M, split), block_m) * block_m
    split = max(1, configs.cdiv(M, m_per_split))
    part = torch.empty((split, C, R), device=x.device, dtype=torch.float32)
    col = torch.empty((split, C), device=x.device, dtype=torch.float32) if colsum else part
    s, s_ptr, s_from_ptr = _scale_args(scale, scale_t, x)
    _reduce_rows_kernel[(c_blocks, split)](
        x, s_mat, part, col, s_ptr, dropout.seed if dropout.on else x,
        M, C, R, m_per_split,
        x.stride(0), x.stride(1), s_mat.stride(0), s_mat.stride(1),
        part.stride(0), part.stride(1), part.stride(2), col.stride(0),
        s, dropout.threshold, dropout.keep_scale,
        SCALE_FROM_PTR=s_from_ptr, DROPOUT=dropout.on, COLSUM=colsum,
        DOT_PRECISION=_precision(x.dtype, allow_tf32),
        BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_R=block_r, num_warps=4 if block_r <= 64 else 8,
    )
    out = part[0] if split == 1 else part.sum(0)
    if not colsum:
        return out, None
    return out, (col[0] if split == 1 else col.sum(0))


# ----------------------------------------------------------------------------------------------
# The op's two halves, in the shapes ops.py hands over (x2d is M×K).


def forward(x2d, weight, lora_A, lora_B, bias, scaling, scaling_t, dropout_p, seed, allow_tf32=False):
    """Returns (y, xa) with xa = dropout(x)·Aᵀ in float32, saved for backward."""
    drop = Dropout(seed, dropout_p)
    if splitk.applies(x2d, weight, lora_A, drop.on):
        args = (x2d, weight, lora_A, lora_B, bias, scaling, scaling_t, allow_tf32)
        key = (x2d.device, configs.m_bucket(x2d.shape[0]), tuple(weight.shape), lora_A.shape[0], x2d.dtype,
               lora_A.dtype, lora_B.dtype, isinstance(weight, NF4Operand) or weight.dtype, bias is not None,
               scaling_t is not None, allow_tf32)
        run_splitk = functools.partial(splitk.forward, *args[:-1], precision=_precision(x2d.dtype, allow_tf32))
        run_gemm = functools.partial(_gemm_forward, *args[:-1], drop, allow_tf32)
        run_gemv = functools.partial(run_splitk, gemv=True) if splitk.gemv_applies(x2d, weight) else None
        run_fused = None if isinstance(weight, NF4Operand) else functools.partial(run_splitk, fused=True)
        path = splitk.choose_path(key, run_gemm, run_splitk, run_gemv, run_fused)
        if path != "gemm":
            return {"gemv": run_gemv, "fused": run_fused}.get(path, run_splitk)()
    return _gemm_forward(x2d, weight, lora_A, lora_B, bias, scaling, scaling_t, drop, allow_tf32)


def _gemm_forward(x2d, weight, lora_A, lora_B, bias, scaling, scaling_t, drop, allow_tf32):
    y = torch.empty((x2d.shape[0], weight.shape[0]), device=x2d.device, dtype=x2d.dtype)
    if configs.fold_xa(x2d.shape[0], lora_A.shape[0], drop.on, x2d.element_size()):
        # Small M: x·Aᵀ rides along in the GEMM's main loop (one launch, x read once).
        xa = torch.empty((x2d.shape[0], lora_A.shape[0]), device=x2d.device, dtype=torch.float32)
        gemm_lowrank(x2d, weight.t(), xa, lora_B.t(), y, bias=bias, scale=scaling, scale_t=scaling_t,
                     fold_a=lora_A.t(), allow_tf32=allow_tf32)
        return y, xa
    xa = skinny_rank(x2d, lora_A.t(), dropout=drop, allow_tf32=allow_tf32)
    gemm_lowrank(x2d, weight.t(), xa, lora_B.t(), y, bias=bias, scale=scaling, scale_t=scaling_t,
                 allow_tf32=allow_tf32)
    return y, xa


def backward(dy, x2d, weight, lora_A, lora_B, xa, scaling, scaling_t, dropout_p, seed,
             need_dx, need_dbias, allow_tf32=False):
    """Returns (dx | None, dA, dB, dbias | None); A/B gradients in the adapters' own dtypes."""
    drop = Dropout(seed, dropout_p)
    g = skinny_rank(dy, lora_B, scale=scaling, scale_t=scaling_t, allow_tf32=allow_tf32)       # s·dy·B
    dB, dbias = reduce_rows(dy, xa, scale=scaling, scale_t=scaling_t, colsum=need_dbias, allow_tf32=allow_tf32)
    dA_t, _ = reduce_rows(x2d, g, dropout=drop, allow_tf32=allow_tf32)                        # (K×r)
    dx = None
    if need_dx:
        dx = torch.empty_like(x2d, memory_format=torch.contiguous_format)
        w_op = weight.plain() if isinstance(weight, NF4Operand) else weight
        gemm_lowrank(dy, w_op, g, lora_A, dx, dropout=drop, allow_tf32=allow_tf32)
    return (dx, dA_t.t().contiguous().to(lora_A.dtype), dB.to(lora_B.dtype),
            None if dbias is None else dbias.to(dy.dtype))
