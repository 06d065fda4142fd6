"""Pure-PyTorch LoRA math: the test oracle, the CPU backend and the unfused baseline.

Everything here runs on any device and in float64. The dropout mask is a pure function of
(seed, row, col) built from 32-bit integer hashing, so the Triton and CUDA kernels regenerate
exactly the same mask in registers and no backend ever stores it.
"""
from __future__ import annotations

import math

import torch

_MASK32 = 0xFFFFFFFF
# lowbias32 constants (a well-mixed 32-bit integer hash); every backend uses these.
HASH_C1 = 0x7FEB352D
HASH_C2 = 0x846CA68B
# Keep decisions compare a 24-bit uniform against a threshold.
DROPOUT_BITS = 24


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2**32 without int64 overflow: split c into 16-bit halves.
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, HASH_C1)
    x = x ^ (x >> 15)
    x = _mul32(x, HASH_C2)
    return x ^ (x >> 16)


def dropout_threshold(p: float) -> int:
    """An element is kept when its 24-bit hash is >= this threshold."""
    return int(math.floor(p * (1 << DROPOUT_BITS) + 0.5))  # round half up, as the C++ kernels do


def dropout_scale(p: float) -> float:
    """1 / (1 - p_effective), with p_effective the probability the threshold really drops."""
    t = dropout_threshold(p)
    return float(1 << DROPOUT_BITS) / float((1 << DROPOUT_BITS) - t)


def dropout_keep(seed: torch.Tensor, rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """Boolean keep-mask of shape (rows, cols) for a 0-d/1-element int64 seed tensor."""
    device = device if device is not None else seed.device
    s = seed.reshape(()).to(device=device, dtype=torch.int64) & 0x7FFFFFFF
    r = torch.arange(rows, device=device, dtype=torch.int64)[:, None]
    c = torch.arange(cols, device=device, dtype=torch.int64)[None, :]
    h = hash32(hash32(r ^ s) ^ c)
    return (h >> (32 - DROPOUT_BITS)) >= dropout_threshold(p)


def apply_dropout(x2d: torch.Tensor, p: float, seed) -> torch.Tensor:
    if p == 0.0 or seed is None:
        return x2d
    keep = dropout_keep(seed, x2d.shape[0], x2d.shape[1], p, device=x2d.device)
    return torch.where(keep, x2d * dropout_scale(p), torch.zeros((), dtype=x2d.dtype, device=x2d.device))


def _scale_value(scaling, scaling_t, dtype, device):
    if scaling_t is not None:
        return scaling_t.to(device=device, dtype=dtype)
    return scaling


def lora_forward(x2d, weight, lora_A, lora_B, bias, scaling, scaling_t, dropout_p, seed):
    """y = x Wᵀ + s·(dropout(x) Aᵀ) Bᵀ + bias, computed in x's dtype (adapters cast to it).

    Returns (y, xa) where xa = dropout(x) Aᵀ is kept in float32 (float64 for float64 input) for backward.
    """
    dt = x2d.dtype
    acc = torch.float64 if dt == torch.float64 else torch.float32
    A = lora_A.to(dt)
    B = lora_B.to(dt)
    s = _scale_value(scaling, scaling_t, dt, x2d.device)
    xa = apply_dropout(x2d, dropout_p, seed) @ A.t()
    y = x2d @ weight.t()
    y = y + (xa @ B.t()) * s
    if bias is not None:
        y = y + bias.to(dt)
    return y, xa.to(acc)


def lora_backward(dy, x2d, weight, lora_A, lora_B, xa, scaling, scaling_t, dropout_p, seed,
                  need_dx: bool, need_dbias: bool):
    """Gradients (dx, dA, dB, dbias) of lora_forward; dx/dbias are None when not needed. No dW."""
    dt = dy.dtype
    A = lora_A.to(dt)
    B = lora_B.to(dt)
    s = _scale_value(scaling, scaling_t, dt, dy.device)
    dys = dy * s                           # scaled first, in the order autograd takes through the composite
    g = dys @ B                            # (M, r): s·dy·B
    xd = apply_dropout(x2d, dropout_p, seed)
    dA = (g.t() @ xd).to(lora_A.dtype)
    dB = (dys.t() @ xa.to(dt)).to(lora_B.dtype)
    dx = None
    if need_dx:
        lora_dx = g @ A
        if dropout_p > 0.0 and seed is not None:
            lora_dx = apply_dropout(lora_dx, dropout_p, seed)  # same mask, same 1/(1-p)
        dx = dy @ weight + lora_dx
    dbias = dy.sum(0) if need_dbias else None
    return dx, dA, dB, dbias


def lora_linear(x, weight, lora_A, lora_B, scaling, bias=None, dropout_p=0.0, seed=None):
    """Autograd-capable reference on any-shaped x (..., K): the oracle tests differentiate this."""
    dt = x.dtype
    xd = x
    if dropout_p > 0.0 and seed is not None:
        x2d = x.reshape(-1, x.shape[-1])
        xd = apply_dropout(x2d, dropout_p, seed).reshape(x.shape)
    s = scaling.to(dt) if torch.is_tensor(scaling) else scaling
    y = x @ weight.t() + ((xd @ lora_A.to(dt).t()) @ lora_B.to(dt).t()) * s
    if bias is not None:
        y = y + bias.to(dt)
    return y


def lora_delta(lora_A, lora_B, scaling) -> torch.Tensor:
    """s·B·A accumulated in float32 (float64 for float64 adapters)."""
    acc = torch.float64 if lora_A.dtype == torch.float64 else torch.float32
    s = scaling.to(acc) if torch.is_tensor(scaling) else scaling
    return (lora_B.to(acc) @ lora_A.to(acc)) * s


_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
             torch.float64: torch.int64}


def merged_value(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """round(W + delta) with one rounding to W's dtype."""
    return (weight.to(delta.dtype) + delta).to(weight.dtype)


def unmerged_value(merged: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """A W' with merged_value(W', delta) == merged bit for bit, where one exists nearby.

    Candidates: round(merged - delta) and its two bit-neighbours. Because W' depends only on the
    merged weight, repeated merge/unmerge cycles return the same W' and drift never grows.
    """
    base = (merged.to(delta.dtype) - delta).to(merged.dtype)
    iv = _INT_VIEW[merged.dtype]
    bits = base.view(iv)
    result = base.clone()
    found = merged_value(base, delta).view(iv) == merged.view(iv)
    for step in (1, -1):
        cand = (bits + step).view(merged.dtype)
        ok = (~found) & (merged_value(cand, delta).view(iv) == merged.view(iv))
        result = torch.where(ok, cand, result)
        found = found | ok
    return result


def merge_(weight, lora_A, lora_B, scaling, unmerge: bool = False):
    delta = lora_delta(lora_A, lora_B, scaling).to(weight.device)
    new = unmerged_value(weight, delta) if unmerge else merged_value(weight, delta)
    weight.copy_(new)
    return weight


# ----------------------------------------------------------------------------------------------
# Many adapters on one base: lora_A (S, R, K), lora_B (S, N, R), scalings (S,), one slot id per row
# (-1 = base only). Ranks below R are zero-padded by the caller, so the math needs no per-slot rank.


def _slot_rows(ids):
    for s in torch.unique(ids).tolist():
        if s >= 0:
            yield s, (ids == s).nonzero().squeeze(1)


def multi_lora_forward(x2d, weight, lora_A, lora_B, scalings, bias, ids):
    """Returns (y, xa) with xa[m] = x[m]·A[ids[m]]ᵀ (zero for base-only rows), kept in float32/64."""
    dt = x2d.dtype
    acc = torch.float64 if dt == torch.float64 else torch.float32
    y = x2d @ weight.t()
    xa = torch.zeros((x2d.shape[0], lora_A.shape[1]), device=x2d.device, dtype=dt)
    for s, rows in _slot_rows(ids):
        t = x2d[rows] @ lora_A[s].to(dt).t()
        y.index_add_(0, rows, (t @ lora_B[s].to(dt).t()) * scalings[s].to(dt))
        xa[rows] = t
    if bias is not None:
        y = y + bias.to(dt)
    return y, xa.to(acc)


def multi_lora_backward(dy, x2d, weight, lora_A, lora_B, xa, scalings, ids, need_dx, need_dbias):
    """(dx | None, dA (S, R, K), dB (S, N, R), dbias | None): each slot's gradient from its own rows only."""
    dt = dy.dtype
    dA = torch.zeros(lora_A.shape, device=dy.device, dtype=dt)
    dB = torch.zeros(lora_B.shape, device=dy.device, dtype=dt)
    dx = dy @ weight if need_dx else None
    for s, rows in _slot_rows(ids):
        sc = scalings[s].to(dt)
        g = (dy[rows] @ lora_B[s].to(dt)) * sc
        dA[s] = g.t() @ x2d[rows]
        dB[s] = (dy[rows].t() @ xa[rows].to(dt)) * sc
        if need_dx:
            dx.index_add_(0, rows, g @ lora_A[s].to(dt))
    dbias = dy.sum(0) if need_dbias else None
    return dx, dA.to(lora_A.dtype), dB.to(lora_B.dtype), dbias
