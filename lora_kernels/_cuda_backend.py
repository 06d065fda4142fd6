"""The "cuda" backend: the compiled ops of lora_kernels._C (csrc/), called from the Python ops.

What runs where: merge_/unmerge_ are CUDA kernels at memory bandwidth; the forward for M <= 16 is
a CUDA decode kernel that reads W once; larger M and the backward compose cuBLAS GEMMs in C++
(no fused large-M CUDA kernel yet; the Triton backend has one). Dropout is not implemented here.
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401 - loading registers torch.ops.lora_kernels.{merge_weight_, linear_*}

_ops = torch.ops.lora_kernels


def _scaling(scaling, scaling_t):
    # The C++ ops take a float: a tensor scaling costs one device-to-host read here.
    return float(scaling_t) if scaling_t is not None else float(scaling)


def _no_dropout(dropout_p, seed):
    if dropout_p > 0.0 and seed is not None:
        raise NotImplementedError("backend='cuda': dropout on the LoRA branch is not implemented in the CUDA "
                                  "kernels yet; use backend='triton' (or 'auto') for training with dropout")


def forward(x2d, weight, lora_A, lora_B, bias, scaling, scaling_t, dropout_p, seed, allow_tf32=False):
    _no_dropout(dropout_p, seed)
    return _ops.linear_forward(x2d, weight, lora_A, lora_B, bias, _scaling(scaling, scaling_t))


def backward(dy, x2d, weight, lora_A, lora_B, xa, scaling, scaling_t, dropout_p, seed, need_dx, need_dbias,
             allow_tf32=False):
    _no_dropout(dropout_p, seed)
    dx, dA, dB, dbias = _ops.linear_backward(dy, x2d, weight, lora_A, lora_B, xa, _scaling(scaling, scaling_t),
                                             need_dx, need_dbias)
    return (dx if need_dx else None, dA, dB, dbias if need_dbias else None)


def merge_(weight, lora_A, lora_B, scaling, unmerge):
    _ops.merge_weight_(weight, lora_A, lora_B, float(scaling), unmerge)
