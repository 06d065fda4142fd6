"""Many adapters on one base: a mixed-adapter batch in one fused pass, and an adapter bank with hot-swap.

Adapters live stacked in preallocated slots: lora_A (S, R, K), lora_B (S, N, R), one scaling per slot;
a rank below R is zero-padded. Each row of a batch names its slot (-1 = base only).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import _backends, ops, reference
from ._checks import check_lora_args
from ._transfer import to_device_async

# ----------------------------------------------------------------------------------------------
# Ops


@torch.library.custom_op("lora_kernels::multi_lora_fwd", mutates_args=())
def multi_lora_fwd(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scalings: Tensor,
                   bias: Optional[Tensor], adapter_ids: Tensor, backend: str, allow_tf32: bool, check_ids: bool
                   ) -> Tuple[Tensor, Tensor]:
    if check_ids:
        _check_id_range(adapter_ids, lora_A.shape[0])
    if backend == "triton":
        return _backends.module("triton").multi_forward(x, weight, lora_A, lora_B, scalings, bias, adapter_ids,
                                                        allow_tf32=allow_tf32)
    return reference.multi_lora_forward(x, weight, lora_A, lora_B, scalings, bias, adapter_ids)


@multi_lora_fwd.register_fake
def _(x, weight, lora_A, lora_B, scalings, bias, adapter_ids, backend, allow_tf32, check_ids):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], lora_A.shape[1]), dtype=acc)


@torch.library.custom_op("lora_kernels::multi_lora_bwd", mutates_args=())
def multi_lora_bwd(dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, xa: Tensor,
                   scalings: Tensor, adapter_ids: Tensor, need_dx: bool, need_dbias: bool, backend: str
                   ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward of the mixed batch: slot-blocked GEMMs for the GPU backends while the bank is small enough,
    else (and for backend 'torch') the reference's loop over the slots present."""
    S, R = lora_A.shape[0], lora_A.shape[1]
    blocked = backend != "torch" and S * R <= MAX_BLOCKED_COLUMNS
    fn = slot_blocked_backward if blocked else reference.multi_lora_backward
    dx, dA, dB, dbias = fn(dy, x, weight, lora_A, lora_B, xa, scalings, adapter_ids, need_dx, need_dbias)
    # two distinct empties: custom-op outputs may not alias each other
    return (dx if dx is not None else dy.new_empty((0,)), dA, dB, dbias if dbias is not None else dy.new_empty((0,)))


@multi_lora_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, xa, scalings, adapter_ids, need_dx, need_dbias, backend):
    return (x.new_empty(x.shape) if need_dx else dy.new_empty((0,)), lora_A.new_empty(lora_A.shape),
            lora_B.new_empty(lora_B.shape), dy.new_empty((dy.shape[1],)) if need_dbias else dy.new_empty((0,)))


# Columns (slots x rank) handled per dense GEMM in slot_blocked_backward: bounds its (rows, columns) temporaries.
BLOCK_COLUMNS = 1024
# Above this many slot columns in all, the blocked GEMMs' wasted work on slots a batch does not use outweighs
# the slot loop's host syncs and small launches, so the slot loop serves.
MAX_BLOCKED_COLUMNS = 2048


def slot_blocked_backward(dy, x2d, weight, lora_A, lora_B, xa, scalings, ids, need_dx, need_dbias):
    """The mixed batch's gradients without a loop over the slots present and without a host sync.

    For a block of slots, row m's low-rank terms sit in its own slot's R columns of an (M, slots·R) matrix,
    zeros elsewhere, so each gradient is one dense GEMM over the stacked adapters: with own = s[id] in row
    m's own columns, G = (dy·B) ⊙ own, dA = Gᵀ·x, dB = dyᵀ·(xa ⊙ own), dx += G·A. The zeros cost
    4·M·(N+K)·R FLOPs per slot not in the batch, hence the MAX_BLOCKED_COLUMNS bound in multi_lora_bwd (the
    slot loop above it). Few ops per block: the step is bound by host time at small batches."""
    S, R, K = lora_A.shape
    dt, N = dy.dtype, lora_B.shape[1]
    dx = dy @ weight if need_dx else None
    cols = torch.arange(S * R, device=dy.device)
    col_slot = cols // R                                             # the slot of each (slot, rank) column
    col_scale = scalings.to(dt)[col_slot]
    per = max(1, BLOCK_COLUMNS // R)
    dAs, dBs = [], []
    for s0 in range(0, S, per):                         # a loop over shapes only: no data-dependent control
        c = slice(s0 * R, min(S, s0 + per) * R)
        n = (c.stop - c.start) // R
        own = torch.where(ids.unsqueeze(1) == col_slot[c], col_scale[c], 0.0)                  # (M, n·R)
        g = (dy @ lora_B[s0:s0 + n].to(dt).permute(1, 0, 2).reshape(N, n * R)) * own
        dAs.append((g.t() @ x2d).view(n, R, K))
        dBs.append((dy.t() @ (xa.to(dt).repeat(1, n) * own)).view(N, n, R))
        if need_dx:
            dx.addmm_(g, lora_A[s0:s0 + n].to(dt).reshape(n * R, K))
    dA = dAs[0] if len(dAs) == 1 else torch.cat(dAs)
    dB = (dBs[0] if len(dBs) == 1 else torch.cat(dBs, dim=1)).permute(1, 0, 2)
    dbias = dy.sum(0) if need_dbias else None
    return dx, dA.to(lora_A.dtype), dB.contiguous().to(lora_B.dtype), dbias


def _setup(ctx, inputs, output):
    x, weight, lora_A, lora_B, scalings, bias, adapter_ids, backend, allow_tf32, check_ids = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1], scalings, adapter_ids)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.backend = backend


def _backward(ctx, dy, _dxa):
    x, weight, lora_A, lora_B, xa, scalings, ids = ctx.saved_tensors
    need_dx, need_dbias = ctx.needs_input_grad[0], ctx.needs_input_grad[5]
    dx, dA, dB, dbias = multi_lora_bwd(dy.contiguous(), x, weight, lora_A, lora_B, xa, scalings, ids,
                                       need_dx, need_dbias, ctx.backend)
    return (dx if need_dx else None, None, dA, dB, None, dbias.to(ctx.bias_dtype) if need_dbias else None,
            None, None, None, None)


multi_lora_fwd.register_autograd(_backward, setup_context=_setup)


# ----------------------------------------------------------------------------------------------
# Public function


def _check_id_range(adapter_ids, slots):
    # Runs inside the op (opaque to torch.compile); one host sync, which check_ids=False skips
    # (needed under CUDA-graph capture). Out-of-range ids would make the kernels read out of bounds.
    if adapter_ids.numel() > 0:
        lo, hi = int(adapter_ids.min()), int(adapter_ids.max())
        if lo < -1 or hi >= slots:
            raise ValueError(f"adapter_ids: values must lie in [-1, {slots - 1}] (slots 0..{slots - 1}, "
                             f"-1 = base only), got min {lo} and max {hi}")


def _check_multi(x, weight, lora_A, lora_B, scalings, adapter_ids):
    if lora_A.dim() != 3 or lora_B.dim() != 3:
        raise ValueError(f"lora_A/lora_B: expected stacked (slots, r, K) and (slots, N, r), got "
                         f"{tuple(lora_A.shape)} and {tuple(lora_B.shape)}")
    check_lora_args(x, weight, lora_A[0], lora_B[0], None, 0.0)
    S = lora_A.shape[0]
    if lora_B.shape[0] != S:
        raise ValueError(f"lora_B: {lora_B.shape[0]} slots, lora_A has {S}")
    if not torch.is_tensor(scalings) or tuple(scalings.shape) != (S,) or scalings.device != x.device:
        raise ValueError(f"scalings: expected a tensor of shape ({S},) on {x.device}")
    if not torch.is_tensor(adapter_ids) or adapter_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError("adapter_ids: expected an int32/int64 tensor (one slot per row, -1 = base only)")
    if adapter_ids.device != x.device:
        raise ValueError(f"adapter_ids: on {adapter_ids.device}, expected {x.device}")


def multi_lora_linear(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scalings: Tensor,
                      adapter_ids: Tensor, bias: Optional[Tensor] = None, *, backend: str = "auto",
                      check_ids: bool = True, allow_tf32: bool = False) -> Tensor:
    """y[m] = x[m]·Wᵀ + bias + s[id]·(x[m]·A[id]ᵀ)·B[id]ᵀ with id = adapter_ids[m] (-1: base only).

    x is (..., K); adapter_ids has shape x.shape[:-1] (one per row) or (x.shape[0],) (one per sequence).
    """
    _check_multi(x, weight, lora_A, lora_B, scalings, adapter_ids)
    rows_shape = x.shape[:-1]
    if tuple(adapter_ids.shape) == tuple(rows_shape):
        ids = adapter_ids.reshape(-1)
    elif x.dim() >= 2 and tuple(adapter_ids.shape) == (x.shape[0],):
        ids = adapter_ids.reshape(-1, *([1] * (x.dim() - 2))).expand(rows_shape).reshape(-1)
    else:
        raise ValueError(f"adapter_ids: expected shape {tuple(rows_shape)} or ({x.shape[0]},), "
                         f"got {tuple(adapter_ids.shape)}")
    name = _backends.resolve(backend, x)
    if name == "cuda":
        raise NotImplementedError("backend='cuda': no multi-adapter CUDA kernel yet; use backend='triton' or 'auto'")
    x2d = x.reshape(-1, x.shape[-1])
    if name != "torch" and x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    y, _ = multi_lora_fwd(x2d, weight, lora_A, lora_B, scalings, bias, ids.to(torch.int32), name, allow_tf32,
                          check_ids)
    return y.reshape(*rows_shape, weight.shape[0])


# ----------------------------------------------------------------------------------------------
# Adapter bank


class LoRAAdapterBank(nn.Module):
    """A frozen linear layer plus `max_adapters` LoRA slots of rank up to `max_rank`.

    load_adapter / unload_adapter write into the preallocated slots in place (no allocation, so
    compiled graphs and captured CUDA graphs stay valid); forward takes one adapter per row.
    """

    def __init__(self, in_features: int, out_features: int, max_adapters: int, max_rank: int, bias: bool = True,
                 device=None, dtype=None, adapter_dtype=None, backend: str = "auto"):
        super().__init__()
        if max_adapters < 1 or max_rank < 1:
            raise ValueError(f"max_adapters and max_rank: expected >= 1, got {max_adapters}, {max_rank}")
        lin = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_from(lin, max_adapters, max_rank, adapter_dtype, backend)

    @classmethod
    def from_linear(cls, linear: nn.Linear, max_adapters: int, max_rank: int, adapter_dtype=None,
                    backend: str = "auto") -> "LoRAAdapterBank":
        """Share (not copy) the linear's weight and bias; they become frozen."""
        bank = cls.__new__(cls)
        nn.Module.__init__(bank)
        bank._init_from(linear, max_adapters, max_rank, adapter_dtype, backend)
        return bank

    def _init_from(self, lin, max_adapters, max_rank, adapter_dtype, backend):
        w = lin.weight.requires_grad_(False)
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.max_adapters, self.max_rank, self.backend = max_adapters, max_rank, backend
        self.weight = w
        self.bias = lin.bias.requires_grad_(False) if lin.bias is not None else None
        fac = {"device": w.device, "dtype": adapter_dtype or w.dtype}
        self.lora_A = nn.Parameter(torch.zeros(max_adapters, max_rank, self.in_features, **fac))
        self.lora_B = nn.Parameter(torch.zeros(max_adapters, self.out_features, max_rank, **fac))
        self.register_buffer("scalings", torch.zeros(max_adapters, device=w.device, dtype=torch.float32))
        self.register_buffer("ranks", torch.zeros(max_adapters, device=w.device, dtype=torch.int32))
        self.slots: Dict[str, int] = {}
        self.active: Optional[str] = None

    @torch.no_grad()
    def load_adapter(self, name: str, lora_A: Tensor, lora_B: Tensor, *, lora_alpha: Optional[float] = None,
                     scaling: Optional[float] = None, use_rslora: bool = False) -> int:
        """Write an adapter (A (r, K), B (N, r)) into its slot (a free one for a new name); returns the slot."""
        r = lora_A.shape[0] if lora_A.dim() == 2 else -1
        if lora_A.dim() != 2 or lora_A.shape[1] != self.in_features or not 1 <= r <= self.max_rank:
            raise ValueError(f"lora_A: expected shape (r <= {self.max_rank}, {self.in_features}), "
                             f"got {tuple(lora_A.shape)}")
        if tuple(lora_B.shape) != (self.out_features, r):
            raise ValueError(f"lora_B: expected shape ({self.out_features}, {r}), got {tuple(lora_B.shape)}")
        if (lora_alpha is None) == (scaling is None):
            raise ValueError("give exactly one of lora_alpha (scaling = alpha/r, or alpha/√r with rsLoRA) or scaling")
        s = scaling if scaling is not None else lora_alpha / (r ** 0.5 if use_rslora else r)
        if name in self.slots:
            slot = self.slots[name]
        else:
            free = [i for i in range(self.max_adapters) if i not in self.slots.values()]
            if not free:
                raise RuntimeError(f"load_adapter: all {self.max_adapters} slots are taken; unload one first")
            slot = free[0]
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.lora_A[slot, :r].copy_(lora_A)
        self.lora_B[slot, :, :r].copy_(lora_B)
        self.scalings[slot].fill_(float(s))
        self.ranks[slot].fill_(r)
        self.slots[name] = slot
        return slot

    @torch.no_grad()
    def unload_adapter(self, name: str):
        slot = self._slot(name)
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.scalings[slot].zero_()
        self.ranks[slot].zero_()
        del self.slots[name]
        if self.active == name:
            self.active = None

    def set_adapter(self, name: Optional[str]):
        """The adapter used when forward gets no adapter_ids (None: base only)."""
        if name is not None:
            self._slot(name)
        self.active = name

    def _slot(self, name: str) -> int:
        if name not in self.slots:
            raise KeyError(f"adapter {name!r} is not loaded (loaded: {sorted(self.slots)})")
        return self.slots[name]

    def ids_for(self, names: Sequence[Optional[str]]) -> Tensor:
        """Slot ids for a list of adapter names (None = base only), on the bank's device."""
        return to_device_async([-1 if n is None else self._slot(n) for n in names], torch.int32, self.weight.device)

    def forward(self, x: Tensor, adapter_ids: Union[Tensor, Sequence[Optional[str]], None] = None) -> Tensor:
        if adapter_ids is None:
            if self.active is None:
                return nn.functional.linear(x, self.weight, self.bias)
            slot = self.slots[self.active]
            return ops.lora_linear(x, self.weight, self.lora_A[slot], self.lora_B[slot], self.scalings[slot],
                                   self.bias, backend=self.backend)
        if not torch.is_tensor(adapter_ids):
            adapter_ids = self.ids_for(adapter_ids)
        return multi_lora_linear(x, self.weight, self.lora_A, self.lora_B, self.scalings, adapter_ids, self.bias,
                                 backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"max_adapters={self.max_adapters}, max_rank={self.max_rank}, loaded={sorted(self.slots)}, "
                f"active={self.active!r}, backend={self.backend!r}")
