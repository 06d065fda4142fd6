"""merge_model / unmerge_model: fold every LoRA adapter of a model into its base weight, and back.

Layers of one shape (and dtypes) are merged by one kernel launch (ops.merge_group_op), so a 7B model's 224
adapted linears take a handful of launches instead of 224. Each layer's bits are exactly what merge_ /
unmerge_ give it alone: re-merge after unmerge is bit-equal, drift never grows. A weight shared by several
adapted layers (tied) gets their adapters in turn; its unmerge is settled so that re-merging them all is
bit-equal too (_settle_shared_unmerge).

Served: FusedLoRALinear, and peft LoRA `Linear` layers over an nn.Linear with one active adapter (patched or
not). Other peft layers (DoRA, lora_bias, fan_in_fan_out, 4-bit bases, several adapters) go through peft's own
merge / unmerge, and one log line says how many and why.
"""
from __future__ import annotations

import bisect
import logging
from collections import Counter, defaultdict
from typing import Callable, List, NamedTuple

import torch
from torch import nn

from . import _backends, ops
from ._checks import check_merge_args
from .modules import FusedLoRALinear
from .nf4 import FusedLoRALinear4bit
from .patch import _base_kind, _peft_linear_classes, _plain_lora, _why_not_fusable

log = logging.getLogger("lora_kernels")


class _Layer(NamedTuple):
    name: str
    weight: torch.Tensor
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    done: Callable[[], None]  # marks the layer merged (or unmerged) once its kernel is queued


def _peft_reason(m, unmerge: bool):
    """None when merge_model serves this peft layer itself (patch._plain_lora, the rule a patched layer's
    own merge follows), else why peft's own merge is used."""
    names = list(m.merged_adapters) if unmerge else list(m.active_adapters)
    if len(names) != 1:
        return f"{len(names)} {'merged' if unmerge else 'active'} adapters"
    if _plain_lora(m, names):
        return None
    if _base_kind(m.get_base_layer()) == "nf4":
        return "4-bit base (peft re-quantises)"
    return _why_not_fusable(m) or "not plain LoRA over an nn.Linear"


def _collect(model: nn.Module, unmerge: bool):
    ours: List[_Layer] = []
    theirs, why, skipped = [], Counter(), Counter()
    peft_classes = _peft_linear_classes()
    for name, m in model.named_modules():
        if type(m) is FusedLoRALinear:
            if m.merged != unmerge:
                continue

            def done(m=m):
                m.merged = not unmerge
            ours.append(_Layer(name, m.weight, m.lora_A, m.lora_B, float(m.scaling), done))
        elif type(m) is FusedLoRALinear4bit:
            skipped["FusedLoRALinear4bit: a 4-bit base is not merged; dequantise it to a FusedLoRALinear first"] += 1
        elif type(m) in peft_classes:
            if bool(m.merged) != unmerge:
                continue
            reason = _peft_reason(m, unmerge)
            if reason is not None:
                theirs.append(m)
                why[reason] += 1
                continue
            adapter = m.merged_adapters[0] if unmerge else m.active_adapters[0]

            def done(m=m, adapter=adapter):
                if unmerge:
                    m.merged_adapters.clear()
                else:
                    m.merged_adapters.append(adapter)
            ours.append(_Layer(name, m.get_base_layer().weight, m.lora_A[adapter].weight,
                               m.lora_B[adapter].weight, float(m.scaling[adapter]), done))
    return ours, theirs, why, skipped


def _byte_range(t):
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def group_layers(layers: List[_Layer]) -> List[List[_Layer]]:
    """Groups that one launch can serve: same shapes, dtypes, strides and device; every tensor contiguous and
    16-byte aligned; no two weights of a group overlap in memory (tied weights go to separate groups, which
    then run one after the other). Layers that fit no group form groups of one."""
    by_key, groups = defaultdict(list), []
    for layer in layers:
        w, a, b = layer.weight, layer.lora_A, layer.lora_B
        if all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in (w, a, b)):
            key = (w.device, w.dtype, tuple(w.shape), a.dtype, tuple(a.shape), b.dtype)
            by_key[key].append(layer)
        else:
            groups.append([layer])
    for members in by_key.values():
        # each wave keeps its weights' byte ranges sorted by start (they never overlap inside a wave), so the
        # overlap test is a bisection, not a scan: 224 layers took ~10 ms of host time with the scan
        waves: List[List[_Layer]] = []
        starts: List[List[int]] = []
        ends: List[List[int]] = []
        for layer in members:
            lo, hi = _byte_range(layer.weight)
            for wave, s, e in zip(waves, starts, ends):
                i = bisect.bisect_right(s, lo)
                if (i == 0 or e[i - 1] <= lo) and (i == len(s) or s[i] >= hi):
                    wave.append(layer)
                    s.insert(i, lo)
                    e.insert(i, hi)
                    break
            else:
                waves.append([layer])
                starts.append([lo])
                ends.append([hi])
        groups += waves
    return groups


def _merge_group(group: List[_Layer], unmerge: bool, backend: str):
    ops.merge_group([g.weight for g in group], [g.lora_A for g in group], [g.lora_B for g in group],
                    [g.scaling for g in group], unmerge, _backends.resolve_merge(backend, group[0].weight))


def _shared_weights(groups: List[List[_Layer]]):
    """Weights that carry several adapters (tied weights): their layers in merge order, by weight."""
    by_weight = defaultdict(list)
    for group in groups:
        for layer in group:
            w = layer.weight
            by_weight[(w.data_ptr(), w.device, w.shape, w.stride())].append(layer)
    return {key: layers for key, layers in by_weight.items() if len(layers) > 1}


_BITS = {2: torch.int16, 4: torch.int32}  # a float's bits as the signed integer of its width


def _ulp_neighbours(w: torch.Tensor):
    """The next representable values above and below each element of w (through its bits)."""
    bits = w.view(_BITS[w.element_size()])
    one = torch.ones((), dtype=bits.dtype, device=w.device)
    minus_zero = torch.iinfo(bits.dtype).min
    negative = bits < 0
    up = torch.where(bits == minus_zero, one, torch.where(negative, bits - one, bits + one))
    down = torch.where(bits == 0, minus_zero + one, torch.where(negative, bits + one, bits - one))
    return up.view(w.dtype), down.view(w.dtype)


def _settle_shared_unmerge(layers: List[_Layer], merged: torch.Tensor, backend: str):
    """Unmerging a weight's adapters one at a time can land a unit away from any value whose re-merge through all
    of them gives the merged bits back: each single unmerge finds a preimage of its own merge, but the last
    one's need not lie in the image of the earlier adapters' merges (where W and the first adapter nearly
    cancel, say). So each element takes, of the unmerged value and its two neighbours, the first whose re-merge
    through every adapter in order is bit-equal to the merged weight (if none is, the unmerged value stays)."""
    w = layers[0].weight
    unmerged = w.detach().clone()
    settled, found = unmerged.clone(), torch.zeros_like(unmerged, dtype=torch.bool)
    ints = _BITS[w.element_size()]
    for cand in (unmerged, *_ulp_neighbours(unmerged)):
        again = cand.clone()
        for layer in layers:
            _merge_group([layer._replace(weight=again)], False, backend)
        take = (again.view(ints) == merged.view(ints)) & ~found
        settled = torch.where(take, cand, settled)
        found |= take
    w.copy_(settled)


@torch.no_grad()
def _run(model: nn.Module, unmerge: bool, backend: str) -> nn.Module:
    ours, theirs, why, skipped = _collect(model, unmerge)
    for layer in ours:  # everything is checked before any weight changes
        try:
            check_merge_args(layer.weight, layer.lora_A, layer.lora_B, layer.scaling)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{layer.name}: {e}") from None
    groups = group_layers(ours)
    shared = _shared_weights(groups) if unmerge else {}
    merged_bits = {key: layers[0].weight.clone() for key, layers in shared.items()}
    # A weight shared by several layers gets their adapters in group order; unmerge takes them off in reverse.
    for group in reversed(groups) if unmerge else groups:
        _merge_group(group, unmerge, backend)
        for g in group:
            g.done()
    for key, layers in shared.items():
        _settle_shared_unmerge(layers, merged_bits[key], backend)
    for m in theirs:
        m.unmerge() if unmerge else m.merge()
    op = "unmerge" if unmerge else "merge"
    detail = "; ".join([f"{n} through peft's own {op} ({reason})" for reason, n in why.items()]
                       + [f"{n} left as they are ({reason})" for reason, n in skipped.items()])
    log.info(f"lora_kernels.{op}_model: {len(ours)} layers {op}d in {len(groups)} groups"
             + (f"; {detail}" if detail else ""))
    return model


def merge_model(model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Merge every LoRA adapter of `model` into its base weight, in place (grouped launches). Returns model."""
    return _run(model, False, backend)


def unmerge_model(model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Undo merge_model (and FusedLoRALinear.merge / peft's merge): the re-merge is bit-equal. Returns model."""
    return _run(model, True, backend)
