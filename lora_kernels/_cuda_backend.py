"""The "cuda" backend: the compiled ops of lora_kernels._C (csrc/), called from the Python ops.

What runs where: merge_/unmerge_ are CUDA kernels; the forward for M <= 2 is a CUDA decode kernel that
reads W once; larger M and the backward compose cuBLAS GEMMs in C++, the big GEMM accumulating into the
low-rank product (no fused large-M CUDA kernel yet; the Triton backend has one). Dropout uses the shared (seed, row, col)
mask through a CUDA kernel; it materialises dropout(x) for the x·Aᵀ product (transient, never saved).
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401 - loading registers torch.ops.lora_kernels.{merge_weight_, linear_*}

_ops = torch.ops.lora_kernels


def eager_linear(x, weight, lora_A, lora_B, bias, scaling: float, dropout_p: float):
    """The whole op, forward and backward, in C++ (csrc/autograd.cpp): the eager path's host time."""
    return _lora_linear(x, weight, lora_A, lora_B, bias, scaling, dropout_p)


_lora_linear = _ops.lora_linear.default


def _scaling(scaling, scaling_t):
    # The C++ ops take a float: a tensor scaling costs one device-to-host read here.
    return float(scaling_t) if scaling_t is not None else float(scaling)


def forward(x2d, weight, lora_A, lora_B, bias, scaling, scaling_t, dropout_p, seed, allow_tf32=False):
    return _ops.linear_forward(x2d, weight, lora_A, lora_B, bias, _scaling(scaling, scaling_t), dropout_p, seed)


def backward(dy, x2d, weight, lora_A, lora_B, xa, scaling, scaling_t, dropout_p, seed, need_dx, need_dbias,
             allow_tf32=False):
    dx, dA, dB, dbias = _ops.linear_backward(dy, x2d, weight, lora_A, lora_B, xa, _scaling(scaling, scaling_t),
                                             need_dx, need_dbias, dropout_p, seed)
    return (dx if need_dx else None, dA, dB, dbias if need_dbias else None)


def merge_(weight, lora_A, lora_B, scaling, unmerge):
    _ops.merge_weight_(weight, lora_A, lora_B, float(scaling), unmerge)
