"""Mixed-adapter batches through a patched peft layer: `model(x, adapter_names=[...])` in one fused pass.

peft serves `adapter_names=` (each sequence of the batch its own adapter, "__base__" for none) with a Python
loop over the adapters present: a gather, two small GEMMs and a scatter-add each. A patched layer instead
stacks its adapters once (rank-padded slots, as multi.LoRAAdapterBank holds them) and runs
multi_lora_linear: one pass whatever the number of adapters in the batch. The stack is a copy of the layer's
adapter weights, kept while the adapters a batch uses are unchanged (rebuilt when one of them was updated
or is new; no copy is kept where autograd must reach the adapters). Cases it does not serve go through
peft's own loop, with a one-time warning naming the reason.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from ._transfer import to_device_async
from .multi import multi_lora_linear

_STACK = "_lora_kernels_mixed_stack"   # per layer: ({name: _state}, slot names, A (S, R, K), B (S, N, R), scalings)
_warned: set = set()


def _warn_once(reason: str):
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"lora_kernels: a mixed-adapter batch (adapter_names=) ran on peft's per-adapter loop: "
                      f"{reason}", stacklevel=4)


def plain_adapter(m, name) -> bool:
    """Adapter `name` of peft layer m is plain LoRA: no DoRA or other variant, no lora_bias."""
    return (name not in getattr(m, "lora_variant", {}) and not getattr(m, "use_dora", {}).get(name, False)
            and not getattr(m, "lora_bias", {}).get(name, False))


def _why_not(m, x, used, base, kind) -> Optional[str]:
    if kind != "linear":
        return "the base layer is not an nn.Linear (4-bit bases have no mixed-batch path)"
    if base.weight.requires_grad:
        return "the base weight is trainable"
    if getattr(m, "fan_in_fan_out", False):
        return "fan_in_fan_out"
    if torch.is_autocast_enabled(x.device.type):
        return "autocast is on"
    drops = m._modules["lora_dropout"]._modules
    for n in used:
        if not plain_adapter(m, n):
            return f"adapter {n!r} is not plain LoRA (DoRA, a variant or lora_bias)"
        d = drops[n]
        if not isinstance(d, (nn.Dropout, nn.Identity)) or (d.training and isinstance(d, nn.Dropout) and d.p > 0):
            return f"adapter {n!r} has an active dropout (training mode)"
    return None


def _weights(m, n):
    """Adapter n's (A, B) parameters, read from the module dicts (nn.Module.__getattr__ costs ~1 µs a lookup)."""
    return (m._modules["lora_A"]._modules[n]._parameters["weight"],
            m._modules["lora_B"]._modules[n]._parameters["weight"])


def _state(m, n, a, b):
    """What a kept slot of adapter n was copied from: the parameters, their storage, versions and scaling."""
    return a, b, a.data_ptr(), b.data_ptr(), a._version, b._version, m.scaling[n]


def _kept_serves(m, kept, used) -> bool:
    """Whether the kept stack holds the current weights of every adapter in the batch. Only those are read
    (a check per call costs ~1-2 µs of host per adapter); an unused adapter that changed is refreshed with
    the next rebuild, before any batch reads it."""
    states = kept[0]
    for n in used:
        st = states.get(n)
        if st is None:
            return False
        a, b = _weights(m, n)
        if a is not st[0] or b is not st[1] or _state(m, n, a, b)[2:] != st[2:]:
            return False
    return True


def _stack(m, used, grad):
    """(slot names, A (S, R, K), B (S, N, R), scalings (S,) float32): the layer's plain adapters of the
    first used adapter's dtype (with grad, only those of the batch, so the others get no gradient rather than
    a zero one), ranks zero-padded to the largest. Kept on the layer while the batch's adapters are unchanged;
    rebuilt, not kept, when autograd must reach the adapters (grad)."""
    kept = m.__dict__.get(_STACK)
    if not grad and kept is not None and _kept_serves(m, kept, used):
        return kept[1:]
    mods_a, mods_b = m._modules["lora_A"]._modules, m._modules["lora_B"]._modules
    dtype = _weights(m, used[0])[0].dtype
    names = tuple(sorted(n for n in (used if grad else mods_a) if plain_adapter(m, n) and n in mods_b
                         and all(t.dtype == dtype for t in _weights(m, n))))
    if not names:  # the first used adapter's A and B differ in dtype: nothing to stack with it
        return names, None, None, None
    As, Bs = zip(*(_weights(m, n) for n in names))
    R = max(a.shape[0] for a in As)
    device = As[0].device
    with torch.inference_mode(False):
        scalings = to_device_async([float(m.scaling[n]) for n in names], torch.float32, device)
    if grad:  # differentiable: gradients reach each adapter's own weights through pad and stack
        A = torch.stack([F.pad(a, (0, 0, 0, R - a.shape[0])) for a in As])
        B = torch.stack([F.pad(b, (0, R - b.shape[1])) for b in Bs])
        return names, A, B, scalings
    # ordinary tensors even under inference_mode: a later call with autograd on may save them for backward
    with torch.inference_mode(False), torch.no_grad():
        A = As[0].new_zeros((len(names), R, As[0].shape[1]))
        B = Bs[0].new_zeros((len(names), Bs[0].shape[0], R))
        for i, (a, b) in enumerate(zip(As, Bs)):
            A[i, :a.shape[0]].copy_(a)
            B[i, :, :b.shape[1]].copy_(b)
    states = {n: _state(m, n, a, b) for n, a, b in zip(names, As, Bs)}
    m.__dict__[_STACK] = (states, names, A, B, scalings)
    return names, A, B, scalings


class _Batch:
    """What every layer of one forward reads from its adapter_names: peft hands all of them the same list, so
    the per-name work (the distinct names, each layer set's slot ids) is done once per batch, not per layer.
    A call is matched to the last batch by comparing the names (a C-level list compare, ~10 ns a name)."""
    __slots__ = ("names", "distinct", "ids")

    def __init__(self, adapter_names):
        self.names = list(adapter_names)
        self.distinct = frozenset(self.names)
        self.ids = {}  # (slot names, device) -> per-sequence slot ids on the device


_last_batch: Optional[_Batch] = None


def _batch(adapter_names) -> _Batch:
    global _last_batch
    batch = _last_batch
    if batch is None or batch.names != (adapter_names if type(adapter_names) is list else list(adapter_names)):
        batch = _last_batch = _Batch(adapter_names)
    return batch


def _slot_ids(batch, names, device):
    """One slot per sequence (-1: "__base__" or an adapter this layer lacks, which peft also runs as base).
    Layers with the same adapters share one device copy per batch, queued from pinned memory (no sync)."""
    ids = batch.ids.get((names, device))
    if ids is None:
        slot = {n: i for i, n in enumerate(names)}
        with torch.inference_mode(False):
            ids = to_device_async([slot.get(n, -1) for n in batch.names], torch.int32, device)
        batch.ids[(names, device)] = ids
    return ids


def mixed_forward(m, x, adapter_names, base, kind, backend):
    """The patched layer's output for a mixed-adapter batch, or None where peft's loop must run it."""
    if torch.compiler.is_compiling():
        return None  # the stack and name caches are eager state: compiled graphs trace peft's loop (README)
    if x.dim() < 2 or len(adapter_names) != x.shape[0]:
        return None  # peft raises its own error for a length mismatch
    layer_adapters = m._modules["lora_A"]._modules
    batch = _batch(adapter_names)
    used = sorted(n for n in batch.distinct if n in layer_adapters)
    if not used:
        return None  # base only: peft runs the base layer and nothing else
    reason = _why_not(m, x, used, base, kind)
    if reason is None:
        grad = torch.is_grad_enabled() and any(t.requires_grad for n in used for t in _weights(m, n))
        names, A, B, scalings = _stack(m, used, grad)
        if any(n not in names for n in used):
            reason = "its adapters have different dtypes"
    if reason is not None:
        _warn_once(reason)
        return None
    weight, bias = base.weight, base.bias
    out_dtype = x.dtype
    if x.dtype != weight.dtype:
        x = x.to(weight.dtype)
    # no CUDA multi-adapter kernel: a layer patched for the cuda backend takes auto's pick here (Triton on GPUs)
    y = multi_lora_linear(x, weight, A, B, scalings, _slot_ids(batch, names, x.device), bias,
                          backend="auto" if backend == "cuda" else backend, check_ids=False)
    return y if y.dtype == out_dtype else y.to(out_dtype)
