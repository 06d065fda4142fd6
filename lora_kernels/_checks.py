"""Argument checks with messages that name the argument and what was expected."""
from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _tensor(name, t):
    if not torch.is_tensor(t):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating dtype (float32, float16, bfloat16), got {t.dtype}")


def check_dropout(p):
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 <= float(p) < 1.0):
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {p!r}")


def check_lora_args(x, weight, lora_A, lora_B, bias, dropout_p):
    _tensor("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight: expected shape (out_features, in_features), got {tuple(weight.shape)}")
    check_lora_shapes(x, weight.shape[0], weight.shape[1], lora_A, lora_B, bias, dropout_p)
    if weight.dtype != x.dtype:
        raise TypeError(f"weight: dtype {weight.dtype} differs from x's {x.dtype}; cast one of them")
    if weight.device != x.device:
        raise ValueError(f"weight: on {weight.device}, expected {x.device} (the device of x)")
    if weight.requires_grad:
        raise ValueError("weight: requires_grad=True, but LoRA never trains the base weight; "
                         "freeze it with weight.requires_grad_(False)")


def check_lora_shapes(x, N, K, lora_A, lora_B, bias, dropout_p):
    """Everything but the base weight itself: x (..., K), A (r, K), B (N, r), bias (N,), dropout."""
    for name, t in (("x", x), ("lora_A", lora_A), ("lora_B", lora_B)):
        _tensor(name, t)
    if bias is not None:
        _tensor("bias", bias)
    if x.dim() < 1:
        raise ValueError("x: expected shape (..., in_features), got a 0-d tensor")
    if x.shape[-1] != K:
        raise ValueError(f"x: last dimension {x.shape[-1]} does not match weight's in_features {K}")
    if lora_A.dim() != 2 or lora_A.shape[1] != K:
        raise ValueError(f"lora_A: expected shape (r, {K}), got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if r == 0:
        raise ValueError("lora_A: rank r must be at least 1, got r=0")
    if lora_B.dim() != 2 or tuple(lora_B.shape) != (N, r):
        raise ValueError(f"lora_B: expected shape ({N}, {r}), got {tuple(lora_B.shape)}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias: expected shape ({N},), got {tuple(bias.shape)}")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: on {t.device}, expected {x.device} (the device of x)")
    check_dropout(dropout_p)


def check_merge_args(weight, lora_A, lora_B, scaling):
    for name, t in (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        _tensor(name, t)
    if weight.dim() != 2:
        raise ValueError(f"weight: expected shape (out_features, in_features), got {tuple(weight.shape)}")
    N, K = weight.shape
    if lora_A.dim() != 2 or lora_A.shape[1] != K or lora_A.shape[0] == 0:
        raise ValueError(f"lora_A: expected shape (r >= 1, {K}), got {tuple(lora_A.shape)}")
    if lora_B.dim() != 2 or tuple(lora_B.shape) != (N, lora_A.shape[0]):
        raise ValueError(f"lora_B: expected shape ({N}, {lora_A.shape[0]}), got {tuple(lora_B.shape)}")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if t.device != weight.device:
            raise ValueError(f"{name}: on {t.device}, expected {weight.device} (the device of weight)")
    if not weight.is_contiguous():
        raise ValueError("weight: merge_/unmerge_ work in place and need a contiguous weight")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise ValueError(f"scaling: expected a finite float, got {scaling!r}")
