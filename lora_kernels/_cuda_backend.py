"""The "cuda" backend: the compiled ops of lora_kernels._C (csrc/), called from the Python ops.

What runs where: merge_/unmerge_ are CUDA kernels; the forward for M <= 8 (16-bit x; 2 for float32), and
9-16 rows outside CUDA-graph captures, is a CUDA decode kernel that reads W once, and a 4-bit (NF4) W has one
for 1-8 rows. For larger M on Hopper (16-bit, rank a multiple of 8 up to 256, built with CUTLASS's headers),
y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ and, without dropout, the backward's dx = dy·W + s·(dy·B)·A are each one CUTLASS GEMM
with the rank-r term as its last K step (csrc/cuda/lowrank_gemm.cu), from 512 rows (LORA_KERNELS_CUTLASS=0
turns it off, LORA_KERNELS_CUTLASS_MIN_ROWS moves the threshold, LORA_KERNELS_CUTLASS_STREAMK=1 adds the
stream-K shape to the timing: measured no faster than the pair), where a problem's first call times it faster
than the cuBLAS pair; otherwise that pair, composed in C++: the big GEMM accumulating into the low-rank product. With dropout, x·Aᵀ and dA come from
kernels that apply the shared (seed, row, col) mask as they load x (dropout(x) never written).
"""
from __future__ import annotations

import os
import warnings

import torch

from . import _C  # noqa: F401 - loading registers torch.ops.lora_kernels.{merge_weight_, linear_*}

_ops = torch.ops.lora_kernels

# Where the one-GEMM path was asked for by name (on Hopper it runs by default where it was built; elsewhere the
# cuBLAS pair is the only form, so a build without it is not news).
if os.environ.get("LORA_KERNELS_CUTLASS") == "1" and not hasattr(_ops, "lowrank_gemm"):
    warnings.warn("lora_kernels: LORA_KERNELS_CUTLASS=1, but the CUDA extension was built without CUTLASS's headers "
                  "(or without sm_90a), so the cuda backend runs its cuBLAS pair; `pip install --no-deps "
                  "nvidia-cutlass` and reinstall lora_kernels to build the one-GEMM kernel", stacklevel=2)


def eager_linear(x, weight, lora_A, lora_B, bias, scaling: float, dropout_p: float):
    """The whole op, forward and backward, in C++ (csrc/autograd.cpp): the eager path's host time."""
    return _lora_linear(x, weight, lora_A, lora_B, bias, scaling, dropout_p)


_lora_linear = _ops.lora_linear.default


def graph_linear(x2d, weight, lora_A, lora_B, bias, scaling: float, dropout_p: float):
    """Under torch.compile: the C++ ops as graph nodes (fake and autograd rules below), so the compiled
    graph calls them directly instead of a Python custom op that calls them (host time per layer)."""
    seed = _ops.seed.default(x2d, lora_A) if dropout_p > 0.0 else None
    return _ops.linear_forward_saved.default(x2d, weight, lora_A, lora_B, bias, scaling, dropout_p, seed)[0]


@torch.library.register_fake("lora_kernels::seed")
def _(like, salt):
    return like.new_empty((), dtype=torch.int64)


@torch.library.register_fake("lora_kernels::linear_forward")
def _(x, weight, lora_A, lora_B, bias, scaling, dropout_p=0.0, seed=None):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], lora_A.shape[0]), dtype=acc)


@torch.library.register_fake("lora_kernels::linear_backward")
def _(dy, x, weight, lora_A, lora_B, xa, scaling, need_dx, need_dbias, dropout_p=0.0, seed=None):
    return (x.new_empty(x.shape) if need_dx else dy.new_empty((0,)), lora_A.new_empty(lora_A.shape),
            lora_B.new_empty(lora_B.shape), dy.new_empty((dy.shape[1],)) if need_dbias else dy.new_empty((0,)))


@torch.library.register_fake("lora_kernels::linear_forward_saved")
def _(x, weight, lora_A, lora_B, bias, scaling, dropout_p=0.0, seed=None):
    def cast(t):  # the adapter in x's dtype where its own differs, else a 0-element tensor (see ops.cpp)
        return t.new_empty(t.shape, dtype=x.dtype) if t.dtype != x.dtype else x.new_empty((0,))
    return (x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], lora_A.shape[0])), cast(lora_A),
            cast(lora_B))


@torch.library.register_fake("lora_kernels::linear_backward_saved")
def _(dy, x, weight, A, B, xa, scaling, need_dx, need_dbias, dropout_p, seed, a_dtype, b_dtype):
    return (x.new_empty(x.shape) if need_dx else dy.new_empty((0,)), A.new_empty(A.shape, dtype=a_dtype),
            B.new_empty(B.shape, dtype=b_dtype), dy.new_empty((dy.shape[1],)) if need_dbias else dy.new_empty((0,)))


def _save(ctx, inputs, A, B, xa):
    x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed = inputs
    ctx.save_for_backward(x, weight, A, B, xa, seed)
    ctx.scaling, ctx.dropout_p = scaling, dropout_p
    ctx.adapter_dtypes = lora_A.dtype, lora_B.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _setup_saved(ctx, inputs, output):
    """The adapters as the forward cast them (its outputs 2 and 3, where they were cast) and x·Aᵀ in x's
    dtype, as the eager C++ autograd path keeps them."""
    _, xa, a_cast, b_cast = output
    _save(ctx, inputs, a_cast if a_cast.dim() == 2 else inputs[2], b_cast if b_cast.dim() == 2 else inputs[3], xa)


def _setup_plain(ctx, inputs, output):  # linear_forward: the adapters as given, x·Aᵀ in float32
    _save(ctx, inputs, inputs[2], inputs[3], output[1])


def _linear_backward(ctx, dy, *_unused):
    x, weight, A, B, xa, seed = ctx.saved_tensors
    need_dx, need_dbias = ctx.needs_input_grad[0], ctx.needs_input_grad[4]
    dx, dA, dB, dbias = _ops.linear_backward_saved.default(dy.contiguous(), x, weight, A, B, xa, ctx.scaling,
                                                           need_dx, need_dbias, ctx.dropout_p, seed,
                                                           *ctx.adapter_dtypes)
    return (dx if need_dx else None, None, dA, dB, dbias.to(ctx.bias_dtype) if need_dbias else None, None, None, None)


# The package's graphs take the _saved form; linear_forward keeps a rule for C++ users' graphs
torch.library.register_autograd("lora_kernels::linear_forward_saved", _linear_backward, setup_context=_setup_saved)
torch.library.register_autograd("lora_kernels::linear_forward", _linear_backward, setup_context=_setup_plain)


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


def nf4_decode(x2d, packed, absmax, code, N, lora_A, lora_B, bias, scaling: float, code2=None, absmax2=None,
               offset: float = 0.0):
    """(y, xa float32) for a 4-bit W and 1 to 8 rows of bf16/fp16 x (csrc/cuda/decode.cu); absmax float32, or
    uint8 codes with code2, absmax2 and offset (double quantisation, decoded inside the kernel)."""
    return _ops.nf4_decode(x2d, packed, absmax, code, N, lora_A, lora_B, bias, float(scaling), code2, absmax2,
                           float(offset))
