"""The op contract: torch.library custom ops, their fake kernels, the autograd rule, backend dispatch.

Public entry points are `lora_linear` and `merge_` / `unmerge_`; everything else is plumbing that
keeps torch.compile(fullgraph=True) able to trace the ops as opaque nodes.
"""
from __future__ import annotations

import inspect
import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import _backends, _env, auto_linear, reference
from ._checks import check_lora_args, check_merge_args

def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,))


# ----------------------------------------------------------------------------------------------
# Forward / backward ops on 2-D x


@torch.library.custom_op("lora_kernels::lora_fwd", mutates_args=())
def lora_fwd(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, bias: Optional[Tensor],
             scaling: float, scaling_t: Optional[Tensor], dropout_p: float, seed: Optional[Tensor],
             backend: str, allow_tf32: bool) -> Tuple[Tensor, Tensor]:
    return _forward_impl(x, weight, lora_A, lora_B, bias, scaling, scaling_t, dropout_p, seed, backend, allow_tf32)


def _forward_impl(x, weight, lora_A, lora_B, bias, scaling, scaling_t, dropout_p, seed, backend, allow_tf32):
    args = (x, weight, lora_A, lora_B, bias, scaling, scaling_t, dropout_p, seed)
    if backend == "torch":
        return reference.lora_forward(*args)
    return _backends.module(backend).forward(*args, allow_tf32=allow_tf32)


@lora_fwd.register_fake
def _(x, weight, lora_A, lora_B, bias, scaling, scaling_t, dropout_p, seed, backend, allow_tf32):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], lora_A.shape[0]), dtype=acc)


@torch.library.custom_op("lora_kernels::lora_bwd", mutates_args=())
def lora_bwd(dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, xa: Tensor,
             scaling: float, scaling_t: Optional[Tensor], dropout_p: float, seed: Optional[Tensor],
             need_dx: bool, need_dbias: bool, backend: str, allow_tf32: bool
             ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dA, dB, dbias); dx and dbias are empty when not asked for. Never a gradient for weight."""
    return _backward_impl(dy, x, weight, lora_A, lora_B, xa, scaling, scaling_t, dropout_p, seed, need_dx,
                          need_dbias, backend, allow_tf32)


def _backward_impl(dy, x, weight, lora_A, lora_B, xa, scaling, scaling_t, dropout_p, seed, need_dx, need_dbias,
                   backend, allow_tf32):
    args = (dy, x, weight, lora_A, lora_B, xa, scaling, scaling_t, dropout_p, seed, need_dx, need_dbias)
    if backend == "torch":
        dx, dA, dB, dbias = reference.lora_backward(*args)
    else:
        dx, dA, dB, dbias = _backends.module(backend).backward(*args, allow_tf32=allow_tf32)
    return (dx if dx is not None else _empty(dy), dA, dB, dbias if dbias is not None else _empty(dy))


@lora_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, xa, scaling, scaling_t, dropout_p, seed, need_dx, need_dbias,
      backend, allow_tf32):
    dx = x.new_empty(x.shape) if need_dx else _empty(dy)
    dbias = dy.new_empty((dy.shape[1],)) if need_dbias else _empty(dy)
    return dx, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape), dbias


def _setup_context(ctx, inputs, output):
    x, weight, lora_A, lora_B, bias, scaling, scaling_t, dropout_p, seed, backend, allow_tf32 = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1], scaling_t, seed)
    ctx.scaling, ctx.dropout_p, ctx.backend, ctx.allow_tf32 = scaling, dropout_p, backend, allow_tf32
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward_through(bwd, ctx, dy):
    x, weight, lora_A, lora_B, xa, scaling_t, seed = ctx.saved_tensors
    need_dx, need_dbias = ctx.needs_input_grad[0], ctx.needs_input_grad[4]
    dx, dA, dB, dbias = bwd(dy.contiguous(), x, weight, lora_A, lora_B, xa, ctx.scaling, scaling_t,
                            ctx.dropout_p, seed, need_dx, need_dbias, ctx.backend, ctx.allow_tf32)
    return (dx if need_dx else None, None, dA, dB, dbias.to(ctx.bias_dtype) if need_dbias else None,
            None, None, None, None, None, None)


def _backward(ctx, dy, _dxa):
    return _backward_through(lora_bwd, ctx, dy)


lora_fwd.register_autograd(_backward, setup_context=_setup_context)


def eager_function(name: str, forward_impl, setup_context, backward):
    """An autograd.Function with a custom op's forward, setup_context and backward rule, called without the
    custom-op layer. In eager mode that layer (schema defaults, dispatch, the compile-disable wrapper) made up
    107 of the 243 us of host time of a small training step on a CPU (bench/results/host-overhead-cpu-
    20261123.txt); on the H100 machine host time exceeded the GPU work of a 2048-row layer. torch.compile,
    export, functorch transforms and tensor subclasses keep going through the registered ops (see _eager).
    The op returns (y, saved); saved is not differentiable."""

    def forward(ctx, *inputs):
        out = forward_impl(*inputs)
        setup_context(ctx, inputs, out)
        ctx.mark_non_differentiable(out[1])
        return out

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward), "backward": staticmethod(backward)})


_EagerLoRA = eager_function("_EagerLoRA", _forward_impl, _setup_context,
                            lambda ctx, dy, _dxa: _backward_through(_backward_impl, ctx, dy))


_PLAIN = (Tensor, torch.nn.Parameter)


def _eager(*tensors) -> bool:
    return (not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active()
            and all(t is None or type(t) in _PLAIN for t in tensors))


# Tagged as seeded random where torch's custom_op takes tags; see draw_seed's docstring.
_SEEDED = ({"tags": (torch.Tag.nondeterministic_seeded,)}
           if "tags" in inspect.signature(torch.library.custom_op).parameters else {})


@torch.library.custom_op("lora_kernels::draw_seed", mutates_args=(), **_SEEDED)
def draw_seed(like: Tensor, salt: Optional[Tensor] = None) -> Tensor:
    """A dropout seed from torch's generator for like's device. An op of its own so that compiled
    graphs draw exactly what eager draws (inductor's own RNG would give other masks). `salt` (the layer's
    lora_A) is not read: it makes each layer's draw a distinct graph node, so that torch.compile's
    common-subexpression pass cannot merge the draws of layers that share an input (q, k and v would share
    a mask). The seeded-random tag says the same where torch honours it."""
    return _seed_from_generator(like)


def _seed_from_generator(like: Tensor) -> Tensor:
    return torch.randint(0, 2**31 - 1, (), device=like.device, dtype=torch.int64)


def dropout_seed(x: Tensor, lora_A: Tensor) -> Tensor:
    """The layer's dropout seed: draw_seed's body called directly in eager mode (the custom-op layer costs
    host time on every call), the registered op where a graph is traced. Both draw the same number."""
    return _seed_from_generator(x) if _eager(x, lora_A) else draw_seed(x, lora_A)


@draw_seed.register_fake
def _(like, salt=None):
    return like.new_empty((), dtype=torch.int64)


# ----------------------------------------------------------------------------------------------
# Merge / unmerge (in place)


def _merge_impl(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, unmerge: bool, backend: str):
    if backend == "torch":
        reference.merge_(weight, lora_A, lora_B, scaling, unmerge=unmerge)
    else:
        _backends.module(backend).merge_(weight, lora_A, lora_B, scaling, unmerge)


@torch.library.custom_op("lora_kernels::merge_", mutates_args=("weight",))
def merge_op(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, unmerge: bool, backend: str) -> None:
    _merge_impl(weight, lora_A, lora_B, scaling, unmerge, backend)


def _eager_untracked(weights, *others) -> bool:
    """Eager tensors (see _eager) and weights that autograd does not track: an in-place write to a leaf that
    needs grad must raise, so such weights keep the custom op's checks."""
    return _eager(*weights, *others) and not (torch.is_grad_enabled() and any(w.requires_grad for w in weights))


def _merge(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, unmerge: bool, backend: str):
    """merge_op; eager calls skip the custom-op layer (~10 µs of host per call, as much as a 4096² merge's
    kernel on a slow host) and bump weight's version themselves, as the op's mutation does, so a backward
    that saved W before the merge still refuses to run with the merged one."""
    if _eager_untracked([weight], lora_A, lora_B):
        _merge_impl(weight, lora_A, lora_B, scaling, unmerge, backend)
        torch.autograd.graph.increment_version(weight)
    else:
        merge_op(weight, lora_A, lora_B, scaling, unmerge, backend)


@merge_op.register_fake
def _(weight, lora_A, lora_B, scaling, unmerge, backend):
    return None


def _merge_group_impl(weights, lora_As, lora_Bs, scalings, unmerge: bool, backend: str):
    if backend == "triton":
        _backends.module("triton").merge_group_(weights, lora_As, lora_Bs, scalings, unmerge)
        return
    for w, a, b, s in zip(weights, lora_As, lora_Bs, scalings):
        _merge_impl(w, a, b, s, unmerge, backend)


@torch.library.custom_op("lora_kernels::merge_group_", mutates_args=("weights",))
def merge_group_op(weights: List[Tensor], lora_As: List[Tensor], lora_Bs: List[Tensor], scalings: List[float],
                   unmerge: bool, backend: str) -> None:
    """merge_op over layers of one shape: one launch on Triton (merging.group_layers makes the groups),
    per layer elsewhere; every layer's bits equal what merge_op gives it alone."""
    _merge_group_impl(weights, lora_As, lora_Bs, scalings, unmerge, backend)


def merge_group(weights, lora_As, lora_Bs, scalings, unmerge: bool, backend: str):
    """merge_group_op; eager calls skip the custom-op layer as _merge does (for lists its checks cost ~1 µs
    per tensor) and bump every weight's version themselves."""
    if _eager_untracked(weights, *lora_As, *lora_Bs):
        _merge_group_impl(weights, lora_As, lora_Bs, scalings, unmerge, backend)
        for w in weights:
            torch.autograd.graph.increment_version(w)
    else:
        merge_group_op(weights, lora_As, lora_Bs, scalings, unmerge, backend)


@merge_group_op.register_fake
def _(weights, lora_As, lora_Bs, scalings, unmerge, backend):
    return None


# ----------------------------------------------------------------------------------------------
# Public functions


def _split_scaling(scaling, device) -> Tuple[float, Optional[Tensor]]:
    if torch.is_tensor(scaling):
        if scaling.numel() != 1:
            raise ValueError(f"scaling: expected a 0-d tensor or a float, got a tensor of shape {tuple(scaling.shape)}")
        if scaling.device != device:
            raise ValueError(f"scaling: tensor is on {scaling.device}, expected {device} (the device of x)")
        return 1.0, scaling.reshape(())
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise TypeError(f"scaling: expected a float or a 0-d tensor, got {type(scaling).__name__}")
    if not math.isfinite(scaling):
        raise ValueError(f"scaling: must be finite, got {scaling}")
    return float(scaling), None


# Eager calls whose arguments were checked and whose backend was resolved before: the metadata of the call
# -> the backend that serves it. Checking and resolving again cost ~40 µs of host per call on the H200
# machine (bench/results/host-profile-h200-20261129-c4adeee.txt), as much as a 2048-row layer's GPU work.
_RESOLVED: dict = {}
_RESOLVED_MAX = 4096  # distinct call shapes kept (varying sequence lengths make new ones); then start over


def _meta(t):
    return None if t is None else (t.shape, t.dtype, t.device, t.requires_grad)


def _call_key(x, weight, lora_A, lora_B, bias, dropout_p, backend, allow_tf32):
    """Everything the checks and the backend choice read: shapes, dtypes, devices, which tensors need a
    gradient, whether autograd records, the options, the variable that forces auto's pick and whether a CUDA
    graph is being captured (auto's pick for graphs is by GPU time)."""
    return (_meta(x), _meta(weight), _meta(lora_A), _meta(lora_B), _meta(bias), dropout_p, backend, allow_tf32,
            torch.is_grad_enabled(), _env.get(auto_linear.ENV), _env.get(auto_linear.MERGED_ENV),
            x.is_cuda and torch.cuda.is_current_stream_capturing())


def _resolve_call(x, weight, lora_A, lora_B, bias, s, s_t, dropout_p, backend):
    """(backend name, whether later calls with the same metadata may reuse it)."""
    if backend == "auto" and s_t is None and _eager(x, weight, lora_A, lora_B, bias) and \
            auto_linear.merged_serves(x, weight, lora_A, lora_B, bias, dropout_p):
        return auto_linear.MERGED, True
    name = _backends.resolve_linear(backend, x, tensor_scaling=s_t is not None)
    # _eager first: under torch.compile nothing of the timing path may be traced (it would break the graph)
    if _eager(x, weight, lora_A, lora_B, bias) and auto_linear.applies(backend, name, x, s_t):
        name = auto_linear.linear_backend(lora_linear, x, weight, lora_A, lora_B, bias, s, dropout_p, default=name)
        return name, auto_linear.settled(x, weight, lora_A, lora_B, bias, dropout_p)
    return name, True


def lora_linear(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling=1.0, bias: Optional[Tensor] = None,
                *, dropout_p: float = 0.0, backend: str = "auto", allow_tf32: bool = False) -> Tensor:
    """y = x·Wᵀ + scaling·(dropout(x)·Aᵀ)·Bᵀ + bias, fused; x is (..., K), W (N, K), A (r, K), B (N, r).

    Dropout (probability `dropout_p`) touches the LoRA branch only; its mask is regenerated in
    backward from a seed drawn from torch's generator and is never stored. `weight` must be frozen.
    """
    key = None
    if type(scaling) is float and math.isfinite(scaling) and _eager(x, weight, lora_A, lora_B, bias):
        key = _call_key(x, weight, lora_A, lora_B, bias, dropout_p, backend, allow_tf32)
        name = _RESOLVED.get(key)
        if name is not None:
            return _run(name, x, weight, lora_A, lora_B, bias, scaling, None, float(dropout_p), allow_tf32, True)
    check_lora_args(x, weight, lora_A, lora_B, bias, dropout_p)
    s, s_t = _split_scaling(scaling, x.device)
    name, reusable = _resolve_call(x, weight, lora_A, lora_B, bias, s, s_t, float(dropout_p), backend)
    if key is not None and reusable:
        if len(_RESOLVED) >= _RESOLVED_MAX:
            _RESOLVED.clear()
        _RESOLVED[key] = name
    return _run(name, x, weight, lora_A, lora_B, bias, s, s_t, float(dropout_p), allow_tf32)


def _run(name, x, weight, lora_A, lora_B, bias, s, s_t, dropout_p, allow_tf32, eager=None):
    """eager: whether _eager(x, weight, lora_A, lora_B, bias) holds, where the caller knows (~1 µs of host)."""
    if name == auto_linear.ADDMM:  # auto's measured pick (float scaling, eager)
        return auto_linear.addmm_linear(x, weight, lora_A, lora_B, bias, s, dropout_p)
    if name == auto_linear.MERGED:  # auto, forward only, no dropout (float scaling, eager)
        return auto_linear.merged_linear(x, weight, lora_A, lora_B, bias, s)
    if name == "cuda" and s_t is None:
        if eager if eager is not None else _eager(x, weight, lora_A, lora_B, bias):
            # Forward and backward in C++: one dispatcher call, no Python in backward; same kernels, same seed.
            return _backends.cuda_backend().eager_linear(x, weight, lora_A, lora_B, bias, s, dropout_p)
        if torch.compiler.is_compiling():
            x2d = x.reshape(-1, x.shape[-1]).contiguous()
            y = _backends.cuda_backend().graph_linear(x2d, weight, lora_A, lora_B, bias, s, dropout_p)
            return y.reshape(*x.shape[:-1], weight.shape[0])
    seed = None
    if dropout_p > 0.0:
        seed = dropout_seed(x, lora_A)
    x2d = x.reshape(-1, x.shape[-1])
    if name != "torch" and x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    fwd = _EagerLoRA.apply if _eager(x2d, weight, lora_A, lora_B, bias, s_t) else lora_fwd
    y, _ = fwd(x2d, weight, lora_A, lora_B, bias, s, s_t, dropout_p, seed, name, allow_tf32)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def merge_(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, *, backend: str = "auto") -> Tensor:
    """W ← round(W + scaling·B·A), the product accumulated in float32 and rounded once. Returns weight."""
    check_merge_args(weight, lora_A, lora_B, scaling)
    _merge(weight, lora_A, lora_B, float(scaling), False, _backends.resolve_merge(backend, weight))
    return weight


def unmerge_(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, *, backend: str = "auto") -> Tensor:
    """Undo merge_: picks the W' whose re-merge is bit-equal to the merged weight, so drift never grows."""
    check_merge_args(weight, lora_A, lora_B, scaling)
    _merge(weight, lora_A, lora_B, float(scaling), True, _backends.resolve_merge(backend, weight))
    return weight
