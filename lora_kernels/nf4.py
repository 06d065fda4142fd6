"""4-bit NormalFloat (NF4) base weights, in bitsandbytes' layout, with the fused LoRA op on top.

Layout (as bitsandbytes' 4-bit weights): the weight (N, K) flattened row-major into blocks of 64;
two 4-bit codes per byte, the first element in the high nibble; one absmax per block. With double
quantization the absmaxes, minus their mean (`offset`), are stored as 8-bit codes of a dynamic
map in blocks of 256, each with a float32 absmax of its own. Dequantised: NF4[q]·absmax(block).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from . import _backends, _env, reference
from ._checks import check_dropout, check_lora_shapes
from .ops import _eager, eager_function

NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)


_CODE_ON_DEVICE = {}


def code_table(device) -> Tensor:
    """NF4_CODE on `device`, copied there once: a per-call copy from host memory synchronised the stream on
    every forward and backward (and cannot be captured in a CUDA graph)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" must share one copy
        device = torch.device("cuda", torch.cuda.current_device())
    table = _CODE_ON_DEVICE.get(device)
    if table is None:
        table = _CODE_ON_DEVICE[device] = NF4_CODE.to(device)
    return table


def dynamic_map(signed: bool = True, exponent_bits: int = 7, total_bits: int = 8) -> Tensor:
    """The 8-bit dynamic (exponent + fraction) code used for double-quantised absmaxes, sorted."""
    values = []
    non_sign = total_bits - 1
    for i in range(exponent_bits):
        n = int(2 ** (i + non_sign - exponent_bits) + 1 if signed else 2 ** (i + non_sign - exponent_bits + 1) + 1)
        edges = torch.linspace(0.1, 1, n)
        mids = ((edges[:-1] + edges[1:]) / 2.0).tolist()
        scale = 10 ** (-(exponent_bits - 1) + i)
        values += [scale * m for m in mids]
        if signed:
            values += [-scale * m for m in mids]
    extra = 2 ** (non_sign - exponent_bits) - 1
    if extra > 0:
        edges = torch.linspace(0.1, 1, extra + 1)
        mids = ((edges[:-1] + edges[1:]) / 2.0).tolist()
        scale = 10 ** (-(exponent_bits - 1) + exponent_bits - 1)
        values += [scale * m for m in mids] + ([-scale * m for m in mids] if signed else [])
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


def _nearest(values: Tensor, code: Tensor) -> Tensor:
    """Index of the nearest entry of a sorted code for each value."""
    mids = (code[1:] + code[:-1]) / 2
    return torch.bucketize(values.contiguous(), mids.to(values.device))


@dataclass
class NF4Weight:
    """A 4-bit weight. absmax is uint8 codes when double-quantised (then offset, absmax2, code2 are set)."""
    packed: Tensor                   # uint8, (N*K/2, 1)
    absmax: Tensor                   # float32 (blocks,) or uint8 (blocks,)
    shape: tuple
    dtype: torch.dtype
    blocksize: int = 64
    offset: Optional[float] = None
    absmax2: Optional[Tensor] = None  # float32 (ceil(blocks/256),)
    code2: Optional[Tensor] = None    # float32 (256,)
    blocksize2: int = 256

    def block_absmax(self) -> Tensor:
        """float32 absmax per 64-element block (decoding the double quantisation)."""
        if self.absmax.dtype == torch.float32:
            return self.absmax
        q = self.absmax.long()
        blocks2 = torch.arange(q.numel(), device=q.device) // self.blocksize2
        return self.code2.to(q.device)[q] * self.absmax2[blocks2] + self.offset

    def kernel_absmax(self) -> Tensor:
        """block_absmax for the kernels: on a GPU, double-quantised absmaxes decoded in one Triton launch
        (the same bits); elsewhere, and while torch.compile traces (it fuses the expression itself), the torch
        expression."""
        if (self.absmax.dtype == torch.float32 or not self.absmax.is_cuda or torch.compiler.is_compiling()
                or self.code2.device != self.absmax.device or not _backends.triton_available()):
            return self.block_absmax().float()
        from .triton import decode_absmax
        return decode_absmax(self.absmax, self.code2, self.absmax2, self.offset, self.blocksize2)

    def nbytes(self) -> int:
        extra = 0 if self.absmax2 is None else self.absmax2.numel() * 4 + self.code2.numel() * 4
        return self.packed.numel() + self.absmax.numel() * self.absmax.element_size() + extra


def quantize_nf4(weight: Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    if weight.dim() != 2 or weight.numel() % 2 or weight.numel() == 0:
        raise ValueError(f"weight: expected a 2-D tensor with an even, non-zero number of elements, "
                         f"got {tuple(weight.shape)}")
    flat = weight.detach().reshape(-1).float()
    n = flat.numel()
    blocks = math.ceil(n / blocksize)
    padded = torch.zeros(blocks * blocksize, device=flat.device)
    padded[:n] = flat
    absmax = padded.view(blocks, blocksize).abs().amax(1)
    normed = padded.view(blocks, blocksize) / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    q = _nearest(normed.reshape(-1)[:n], NF4_CODE).to(torch.uint8)
    packed = ((q[0::2] << 4) | q[1::2]).reshape(-1, 1)
    out = NF4Weight(packed, absmax, tuple(weight.shape), weight.dtype, blocksize)
    if double_quant:
        offset = absmax.mean()
        centred = absmax - offset
        b2 = math.ceil(blocks / 256)
        pad2 = torch.zeros(b2 * 256, device=flat.device)
        pad2[:blocks] = centred
        absmax2 = pad2.view(b2, 256).abs().amax(1)
        normed2 = pad2.view(b2, 256) / absmax2.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
        code2 = dynamic_map().to(flat.device)
        out.absmax = _nearest(normed2.reshape(-1)[:blocks], code2).to(torch.uint8)
        out.offset, out.absmax2, out.code2 = float(offset), absmax2, code2
    return out


def dequantize_nf4(qw: NF4Weight, dtype: Optional[torch.dtype] = None) -> Tensor:
    p = qw.packed.reshape(-1)
    codes = torch.stack([p >> 4, p & 15], 1).reshape(-1).long()
    n = math.prod(qw.shape)
    vals = code_table(p.device)[codes[:n]]
    scale = qw.block_absmax().to(p.device).repeat_interleave(qw.blocksize)[:n]
    return (vals * scale).reshape(qw.shape).to(dtype or qw.dtype)


def from_bnb(param) -> NF4Weight:
    """An NF4Weight viewing a bitsandbytes Params4bit's storage and quant state as they are (no copy)."""
    qs = param.quant_state
    if getattr(qs, "quant_type", "nf4") != "nf4":
        raise ValueError(f"quant_state: quant_type {qs.quant_type!r} is not supported, only 'nf4'")
    nested = getattr(qs, "nested", False) or getattr(qs, "state2", None) is not None
    return NF4Weight(param.data, qs.absmax, tuple(qs.shape), qs.dtype, qs.blocksize,
                     offset=float(qs.offset) if nested else None,
                     absmax2=qs.state2.absmax if nested else None, code2=qs.state2.code if nested else None,
                     blocksize2=qs.state2.blocksize if nested else 256)


# ----------------------------------------------------------------------------------------------
# The fused op on a 4-bit base: y = x·dequant(W)ᵀ + s·(dropout(x)·Aᵀ)·Bᵀ + bias, W never materialised
# by the Triton backend (tiles are dequantised in registers), forward and dx alike.


def _dequant(packed: Tensor, absmax: Tensor, N: int, K: int, dtype) -> Tensor:
    return dequantize_nf4(NF4Weight(packed, absmax, (N, K), dtype))


def _operand(packed, absmax, N, K):
    from .triton import NF4Operand
    return NF4Operand(packed, absmax, code_table(packed.device), N, K)


@torch.library.custom_op("lora_kernels::lora4_fwd", mutates_args=())
def lora4_fwd(x: Tensor, packed: Tensor, absmax: Tensor, N: int, K: int, lora_A: Tensor, lora_B: Tensor,
              bias: Optional[Tensor], scaling: float, scaling_t: Optional[Tensor], dropout_p: float,
              seed: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor]:
    return _forward4_impl(x, packed, absmax, N, K, lora_A, lora_B, bias, scaling, scaling_t, dropout_p, seed, backend)


# From this many rows on, W dequantised whole for the dense kernels (cuBLAS where the extension is built) is
# measured against dequantising tile by tile in our GEMM, per shape (triton.measured); below, W is read once.
DEQUANT_MIN_ROWS = 128


def _via_dense(x, scaling_t, K) -> str:
    """The dense backend that runs a dequantised W, or '' where the per-tile path must serve."""
    if x.shape[0] < DEQUANT_MIN_ROWS or K % 64 != 0:
        return ""
    if not x.is_cuda:
        return "triton" if _env.interpreting() else ""
    return "cuda" if scaling_t is None and _backends.cuda_ext_available() else "triton"


def _pick(tri, key, tiled, dense) -> str:
    """'tiled' or 'dense' (LORA_KERNELS_NF4=tiled|dense forces one)."""
    return tri.choose(key, {"tiled": tiled, "dense": dense}, "tiled", "LORA_KERNELS_NF4", by="gpu")


def _forward4_impl(x, packed, absmax, N, K, lora_A, lora_B, bias, scaling, scaling_t, dropout_p, seed, backend):
    args = (lora_A, lora_B, bias, scaling, scaling_t, dropout_p, seed)
    if backend == "cuda":  # only for the calls _extension_decode_fits accepts
        if scaling_t is not None or dropout_p > 0.0:
            raise ValueError("the extension's 4-bit decode takes a float scaling and no dropout")
        return _backends.cuda_backend().nf4_decode(x, packed, absmax, code_table(x.device), N, lora_A, lora_B,
                                                   bias, scaling)
    if backend == "triton":
        tri = _backends.module("triton")
        w = _operand(packed, absmax, N, K)
        tiled = functools.partial(tri.forward, x, w, *args)
        via = _via_dense(x, scaling_t, K)
        if not via:
            return tiled()

        def dense():
            return _backends.module(via).forward(x, tri.dequantize(w, x.dtype), *args)
        key = ("nf4 fwd", via, x.device, tri.configs.m_bucket(x.shape[0]), N, K, lora_A.shape[0], x.dtype, lora_A.dtype,
               lora_B.dtype, bias is not None, dropout_p > 0.0)
        return (dense if _pick(tri, key, tiled, dense) == "dense" else tiled)()
    return reference.lora_forward(x, _dequant(packed, absmax, N, K, x.dtype), *args)


@lora4_fwd.register_fake
def _(x, packed, absmax, N, K, lora_A, lora_B, bias, scaling, scaling_t, dropout_p, seed, backend):
    return x.new_empty((x.shape[0], N)), x.new_empty((x.shape[0], lora_A.shape[0]), dtype=torch.float32)


@torch.library.custom_op("lora_kernels::lora4_bwd", mutates_args=())
def lora4_bwd(dy: Tensor, x: Tensor, packed: Tensor, absmax: Tensor, N: int, K: int, lora_A: Tensor,
              lora_B: Tensor, xa: Tensor, scaling: float, scaling_t: Optional[Tensor], dropout_p: float,
              seed: Optional[Tensor], need_dx: bool, need_dbias: bool, backend: str
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _backward4_impl(dy, x, packed, absmax, N, K, lora_A, lora_B, xa, scaling, scaling_t, dropout_p, seed,
                           need_dx, need_dbias, backend)


def _backward4_impl(dy, x, packed, absmax, N, K, lora_A, lora_B, xa, scaling, scaling_t, dropout_p, seed, need_dx,
                    need_dbias, backend):
    rest = (lora_A, lora_B, xa, scaling, scaling_t, dropout_p, seed, need_dx, need_dbias)
    if backend == "cuda":  # the extension has a 4-bit forward for decode only; Triton's backward serves it
        backend = "triton" if _backends.triton_available() else "torch"
    if backend == "triton":
        tri = _backends.module("triton")
        w = _operand(packed, absmax, N, K)
        tiled = functools.partial(tri.backward, dy, x, w, *rest)
        via = _via_dense(x, scaling_t, K) if need_dx else ""  # only dx reads W
        if via:

            def dense():
                return _backends.module(via).backward(dy, x, tri.dequantize(w, dy.dtype), *rest)
            key = ("nf4 bwd", via, x.device, tri.configs.m_bucket(x.shape[0]), N, K, lora_A.shape[0], x.dtype, lora_A.dtype,
                   lora_B.dtype, need_dbias, dropout_p > 0.0)
            tiled = dense if _pick(tri, key, tiled, dense) == "dense" else tiled
        dx, dA, dB, dbias = tiled()
    else:
        dx, dA, dB, dbias = reference.lora_backward(dy, x, _dequant(packed, absmax, N, K, x.dtype), *rest)
    # two distinct empties: custom-op outputs may not alias each other
    return (dx if dx is not None else dy.new_empty((0,)), dA, dB, dbias if dbias is not None else dy.new_empty((0,)))


@lora4_bwd.register_fake
def _(dy, x, packed, absmax, N, K, lora_A, lora_B, xa, scaling, scaling_t, dropout_p, seed, need_dx, need_dbias,
      backend):
    return (x.new_empty(x.shape) if need_dx else dy.new_empty((0,)), lora_A.new_empty(lora_A.shape),
            lora_B.new_empty(lora_B.shape), dy.new_empty((N,)) if need_dbias else dy.new_empty((0,)))


def _setup(ctx, inputs, output):
    x, packed, absmax, N, K, lora_A, lora_B, bias, scaling, scaling_t, dropout_p, seed, backend = inputs
    ctx.save_for_backward(x, packed, absmax, lora_A, lora_B, output[1], scaling_t, seed)
    ctx.N, ctx.K, ctx.scaling, ctx.dropout_p, ctx.backend = N, K, scaling, dropout_p, backend
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward_through(bwd, ctx, dy):
    x, packed, absmax, lora_A, lora_B, xa, scaling_t, seed = ctx.saved_tensors
    need_dx, need_dbias = ctx.needs_input_grad[0], ctx.needs_input_grad[7]
    dx, dA, dB, dbias = bwd(dy.contiguous(), x, packed, absmax, ctx.N, ctx.K, lora_A, lora_B, xa, ctx.scaling,
                            scaling_t, ctx.dropout_p, seed, need_dx, need_dbias, ctx.backend)
    return (dx if need_dx else None, None, None, None, None, dA, dB,
            dbias.to(ctx.bias_dtype) if need_dbias else None, None, None, None, None, None)


lora4_fwd.register_autograd(lambda ctx, dy, _dxa: _backward_through(lora4_bwd, ctx, dy), setup_context=_setup)
_EagerLoRA4 = eager_function("_EagerLoRA4", _forward4_impl, _setup,
                             lambda ctx, dy, _dxa: _backward_through(_backward4_impl, ctx, dy))


def lora4_linear(x: Tensor, qweight: NF4Weight, lora_A: Tensor, lora_B: Tensor, scaling=1.0,
                 bias: Optional[Tensor] = None, *, dropout_p: float = 0.0, backend: str = "auto") -> Tensor:
    """The fused LoRA linear over a 4-bit NF4 base weight (x in bf16/fp16/fp32; W's nominal dtype = x's)."""
    from .ops import _split_scaling, dropout_seed
    N, K = qweight.shape
    check_lora_shapes(x, N, K, lora_A, lora_B, bias, dropout_p)
    s, s_t = _split_scaling(scaling, x.device)
    x2d = x.reshape(-1, K)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    packed = qweight.packed.reshape(-1)
    decode = _extension_decode_fits(x2d, qweight, packed, K, lora_A, lora_B, s_t, dropout_p)
    if backend == "cuda" and not decode:
        raise NotImplementedError("backend='cuda': the extension's 4-bit kernel serves 1 to 8 rows of a bfloat16 "
                                  "or float16 CUDA x (in_features a multiple of 64, no dropout, a float scaling); "
                                  "use 'triton' or 'auto'")
    name = backend if backend == "cuda" else _backends.resolve(backend, x, prefer=("triton",), what="4-bit linear")
    seed = dropout_seed(x, lora_A) if dropout_p > 0.0 else None
    eager = _eager(x2d, packed, qweight.absmax, lora_A, lora_B, bias, s_t)
    if backend == "auto" and decode and eager and name == "triton":
        name = _decode_backend(x2d, qweight, lora_A, lora_B, bias, s)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, lora_A, lora_B, bias))
    if name == "cuda" and not grad:  # inference: the extension's kernel alone, absmaxes decoded inside it
        return _extension_decode(x2d, qweight, lora_A, lora_B, bias, s)[0].reshape(*x.shape[:-1], N)
    absmax = qweight.kernel_absmax()
    fwd = _EagerLoRA4.apply if eager else lora4_fwd
    y, _ = fwd(x2d, packed, absmax, N, K, lora_A, lora_B, bias, s, s_t, float(dropout_p), seed, name)
    return y.reshape(*x.shape[:-1], N)


DECODE_ENV = "LORA_KERNELS_NF4_DECODE"  # cuda|triton forces auto's pick for 4-bit decode


EXTENSION_DECODE_MAX_ROWS = 8  # csrc/ops.h kNF4DecodeMaxRows: x's rows are the 8 columns of one tensor-core product


def _extension_decode_fits(x2d, qweight, packed, K, lora_A, lora_B, s_t, dropout_p) -> bool:
    """Whether the extension's 4-bit decode kernel serves this call: 1 to 8 rows of a bf16/fp16 CUDA x, whole
    absmax blocks of 64 per row (256 per second-level block), 16-byte aligned x rows and packed bytes, no
    dropout, a float scaling, adapters in x's dtype or float32 (one dtype)."""
    dq_ok = qweight.absmax.dtype == torch.float32 or (
        qweight.blocksize2 == 256 and qweight.absmax2 is not None and qweight.absmax2.dtype == torch.float32
        and qweight.code2 is not None and qweight.code2.device == x2d.device)
    return (x2d.is_cuda and 1 <= x2d.shape[0] <= EXTENSION_DECODE_MAX_ROWS and K % 64 == 0 and dropout_p == 0.0
            and s_t is None and qweight.blocksize == 64 and dq_ok
            and x2d.stride(-1) == 1 and x2d.data_ptr() % 16 == 0 and packed.data_ptr() % 16 == 0
            and x2d.dtype in (torch.bfloat16, torch.float16) and lora_A.dtype == lora_B.dtype
            and lora_A.dtype in (x2d.dtype, torch.float32) and not torch.compiler.is_compiling()
            and _backends.cuda_ext_available())


def _extension_decode(x2d, qweight, lora_A, lora_B, bias, s):
    """(y, xa) by the extension's 4-bit decode kernel, double-quantised absmaxes decoded inside it."""
    N, _ = qweight.shape
    args = (x2d, qweight.packed.reshape(-1), qweight.absmax, code_table(x2d.device), N, lora_A, lora_B, bias, s)
    if qweight.absmax.dtype == torch.float32:
        return _backends.cuda_backend().nf4_decode(*args)
    return _backends.cuda_backend().nf4_decode(*args, qweight.code2, qweight.absmax2, qweight.offset)


def _decode_backend(x2d, qweight, lora_A, lora_B, bias, s) -> str:
    """'cuda' or 'triton' for a 4-bit decode call, by GPU time on its first eager call (decode is served
    under CUDA graphs, where only GPU time counts); LORA_KERNELS_NF4_DECODE forces one. Each option is timed
    as it serves a call, the absmax decoding included."""
    from .triton import measured
    N, K = qweight.shape
    key = ("nf4 decode", x2d.device, x2d.shape[0], N, K, lora_A.shape[0], x2d.dtype, lora_A.dtype,
           bias is not None, qweight.absmax.dtype)

    def triton():
        return _forward4_impl(x2d, qweight.packed.reshape(-1), qweight.kernel_absmax(), N, K, lora_A, lora_B, bias,
                              s, None, 0.0, None, "triton")
    options = {"cuda": functools.partial(_extension_decode, x2d, qweight, lora_A, lora_B, bias, s), "triton": triton}
    with torch.no_grad():  # timed calls record nothing
        pick = measured.choose(key, options, "triton", DECODE_ENV, by="gpu")
    _backends._once(("nf4 decode", key), f"lora_kernels: 4-bit decode {tuple(x2d.shape)}x({N}, {K}) -> {pick} "
                    f"({measured.timings(key) or 'forced or not timed'})")
    return pick


class FusedLoRALinear4bit(nn.Module):
    """FusedLoRALinear over a frozen NF4 base weight (QLoRA): ~0.5 bytes per base parameter.

    Build it with from_linear (quantises the linear's weight) or from_nf4 (a weight already in NF4, such as
    one taken from bitsandbytes with nf4.from_bnb). merge() is not offered: folding B·A into a 4-bit weight
    would re-quantise it and lose the base.
    """

    def __init__(self, qweight: NF4Weight, bias: Optional[Tensor], r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, use_rslora: bool = False, adapter_dtype=None, backend: str = "auto"):
        super().__init__()
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"r: expected an int >= 1, got {r!r}")
        check_dropout(lora_dropout)
        self.out_features, self.in_features = qweight.shape
        self.r, self.lora_alpha, self.lora_dropout, self.use_rslora = r, lora_alpha, float(lora_dropout), use_rslora
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.backend, self.compute_dtype = backend, qweight.dtype
        # The 4-bit storage lives in buffers (so .to(), state_dict and DDP see it); qweight is rebuilt from them.
        dev = qweight.packed.device
        self.register_buffer("packed", qweight.packed)
        self.register_buffer("absmax", qweight.absmax)
        self.register_buffer("absmax2", qweight.absmax2)
        self.register_buffer("code2", qweight.code2)
        self._quant_meta = (qweight.shape, qweight.dtype, qweight.blocksize, qweight.offset, qweight.blocksize2)
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None
        fac = {"device": dev, "dtype": adapter_dtype or qweight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **fac))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **fac))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @property
    def qweight(self) -> NF4Weight:
        shape, dtype, blocksize, offset, blocksize2 = self._quant_meta
        return NF4Weight(self.packed, self.absmax, shape, dtype, blocksize, offset, self.absmax2, self.code2,
                         blocksize2)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, lora_alpha: float = 8, double_quant: bool = True,
                    **kw) -> "FusedLoRALinear4bit":
        return cls(quantize_nf4(linear.weight, double_quant=double_quant), linear.bias, r=r, lora_alpha=lora_alpha,
                   **kw)

    @classmethod
    def from_nf4(cls, qweight: NF4Weight, bias=None, **kw) -> "FusedLoRALinear4bit":
        return cls(qweight, bias, **kw)

    def forward(self, x: Tensor) -> Tensor:
        p = self.lora_dropout if self.training else 0.0
        out_dtype = x.dtype
        if x.dtype != self.compute_dtype:
            x = x.to(self.compute_dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return lora4_linear(x, self.qweight, self.lora_A, self.lora_B, self.scaling, bias, dropout_p=p,
                            backend=self.backend).to(out_dtype)

    def merge(self):
        raise NotImplementedError("merge() on a 4-bit base would re-quantise it; dequantise to a FusedLoRALinear "
                                  "(nf4.dequantize_nf4) and merge there")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"scaling={self.scaling:g}, dropout={self.lora_dropout}, base=nf4 "
                f"({self.qweight.nbytes() / (self.in_features * self.out_features):.3f} bytes/param), "
                f"backend={self.backend!r}")
