"""patch(model): give an existing model's LoRA layers the fused forward, changing nothing else.

peft models: each peft LoRA `Linear` keeps its class, parameters, state_dict keys and save_pretrained
output; only its instance `forward`, `merge` and `unmerge` are replaced (merges then run the bit-exact
kernels of ops.merge_, also inside peft's `merge_and_unload()` / `merge_adapter()` / `unmerge_adapter()`). Layers the fused op can't serve (DoRA and other
variants, several active adapters, lora_bias, fan_in_fan_out, bases other than nn.Linear or a bitsandbytes
NF4 Linear4bit, a trainable base weight) keep peft's forward, and one log line lists them with the reason.
A patched layer called with peft's `adapter_names=` (a mixed-adapter batch) runs one fused pass over its
stacked adapters (patch_mixed.py) instead of peft's loop over them.

Plain models: `patch(model, target_modules=[...], r=..., lora_alpha=...)` wraps the nn.Linear layers
whose names end in one of target_modules into FusedLoRALinear (sharing their weight tensors).
"""
from __future__ import annotations

import logging
import types
from collections import Counter
from typing import Iterable, Optional

import torch
from torch import nn

from . import nf4, ops
from .modules import FusedLoRALinear
from .nf4 import lora4_linear
from .patch_mixed import mixed_forward, plain_adapter

log = logging.getLogger("lora_kernels")
_MARK = "_lora_kernels_patched"


def _peft_linear_classes():
    """peft's LoRA Linear, and its bitsandbytes 4-bit variant where peft ships one."""
    classes = []
    try:
        from peft.tuners.lora.layer import Linear
        classes.append(Linear)
    except Exception:  # noqa: BLE001 - peft is optional
        return ()
    try:
        from peft.tuners.lora.bnb import Linear4bit
        classes.append(Linear4bit)
    except Exception:  # noqa: BLE001 - bitsandbytes is optional
        pass
    return tuple(classes)


def _base_kind(base) -> Optional[str]:
    """"linear" for nn.Linear, "nf4" for a bitsandbytes NF4 Linear4bit, None for anything else."""
    if type(base) is nn.Linear:
        return "linear"
    qs = getattr(getattr(base, "weight", None), "quant_state", None)
    if type(base).__name__ == "Linear4bit" and qs is not None and getattr(qs, "quant_type", None) == "nf4":
        return "nf4"
    return None


def _base_layer(m):
    """peft's get_base_layer (follow .base_layer down) without nn.Module.__getattr__'s slow path: the forward
    runs this per layer and call, where get_base_layer's hasattr loop cost ~2.6 µs of host."""
    base = m
    while True:
        nxt = base._modules.get("base_layer", base.__dict__.get("base_layer"))
        if nxt is None:
            return base
        base = nxt


def _param(m, name):
    """m.<name> for a parameter (or None) registered on m, read from m._parameters: nn.Module.__getattr__
    costs ~0.8 µs a lookup, and the forward makes four per call; anything else through getattr."""
    params = m._parameters
    return params[name] if name in params else getattr(m, name)


def _why_not_fusable(m, base=None, kind=None) -> Optional[str]:
    """None when the fused path serves this peft layer's current configuration, else the reason. base / kind:
    m's base layer and its _base_kind, where the caller has them already (the forward runs this per call;
    submodules are read from _modules, not through nn.Module.__getattr__, ~0.6 µs per lookup)."""
    active = m.active_adapters
    if len(active) != 1:
        return f"{len(active)} active adapters"
    name = active[0]
    mods = m._modules
    if name not in mods["lora_A"]._modules:
        return "active adapter has no LoRA weights here"
    if name in getattr(m, "lora_variant", {}) or getattr(m, "use_dora", {}).get(name, False):
        return "DoRA / LoRA variant"
    if getattr(m, "lora_bias", {}).get(name, False):
        return "lora_bias"
    if getattr(m, "fan_in_fan_out", False):
        return "fan_in_fan_out"
    if base is None:
        base = _base_layer(m)
        kind = _base_kind(base)
    if kind is None:
        return f"base layer is {type(base).__name__}, not nn.Linear or an NF4 Linear4bit"
    if _param(base, "weight").requires_grad:
        return "base weight is trainable"
    drop = mods["lora_dropout"]._modules[name]
    if not isinstance(drop, (nn.Dropout, nn.Identity)):
        return f"dropout module {type(drop).__name__}"
    return None


def _fused_peft_forward(self, x, *args, **kwargs):
    # Runs once per layer per step: the base layer and its kind are looked up once and shared with the check.
    if args or self.disable_adapters or self.merged:
        return type(self).forward(self, x, *args, **kwargs)
    base = _base_layer(self)
    kind = _base_kind(base)
    names = kwargs.get("adapter_names")
    if names is not None:  # a mixed-adapter batch: one fused pass instead of peft's loop where it serves
        y = mixed_forward(self, x, names, base, kind, getattr(self, _MARK)) if len(kwargs) == 1 else None
        return y if y is not None else type(self).forward(self, x, *args, **kwargs)
    if _why_not_fusable(self, base, kind) is not None:
        return type(self).forward(self, x, *args, **kwargs)
    name = self.active_adapters[0]
    mods = self._modules
    drop = mods["lora_dropout"]._modules[name]
    p = drop.p if drop.training and isinstance(drop, nn.Dropout) else 0.0
    weight, bias = _param(base, "weight"), _param(base, "bias")
    lora_A = _param(mods["lora_A"]._modules[name], "weight")
    lora_B = _param(mods["lora_B"]._modules[name], "weight")
    backend = getattr(self, _MARK)
    if kind == "nf4":
        # bitsandbytes' storage used as it is: codes and quant state are read, never copied or dequantised.
        dt = getattr(base, "compute_dtype", None) or x.dtype
        y = lora4_linear(x.to(dt), nf4.from_bnb(weight), lora_A, lora_B, self.scaling[name],
                         bias.to(dt) if bias is not None else None, dropout_p=p, backend=backend)
        return y.to(x.dtype)
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        # What autocast does for F.linear: compute in the autocast dtype.
        dt = torch.get_autocast_dtype(dev)
        x, weight = x.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
        with torch.autocast(dev, enabled=False):
            return ops.lora_linear(x, weight, lora_A, lora_B, self.scaling[name], bias, dropout_p=p, backend=backend)
    out_dtype = x.dtype
    if out_dtype != weight.dtype:
        x = x.to(weight.dtype)
    y = ops.lora_linear(x, weight, lora_A, lora_B, self.scaling[name], bias, dropout_p=p, backend=backend)
    return y if y.dtype == out_dtype else y.to(out_dtype)


def _plain_lora(m, names) -> bool:
    """True when every adapter in names is plain LoRA over an nn.Linear, which merge_ / unmerge_ serve."""
    if _base_kind(m.get_base_layer()) != "linear" or getattr(m, "fan_in_fan_out", False):
        return False
    return all(n in m.lora_A and plain_adapter(m, n) for n in names)


def _adapter(m, n):
    return m.lora_A[n].weight.detach(), m.lora_B[n].weight.detach(), float(m.scaling[n])


@torch.no_grad()
def _fused_peft_merge(self, safe_merge: bool = False, adapter_names=None):
    """peft's merge (same arguments, same bookkeeping) with W ← round(W + s·B·A) rounded once."""
    from peft.tuners.tuners_utils import check_adapters_to_merge
    names = check_adapters_to_merge(self, adapter_names)
    if not names:
        return
    if not _plain_lora(self, names):
        return type(self).merge(self, safe_merge=safe_merge, adapter_names=names)
    weight = self.get_base_layer().weight
    target = weight.detach().clone() if safe_merge else weight
    for n in names:
        ops.merge_(target, *_adapter(self, n), backend=getattr(self, _MARK))
    if safe_merge:
        if not torch.isfinite(target).all():
            raise ValueError(f"merging adapter(s) {names} would put NaN or inf into the weight; weight unchanged")
        weight.copy_(target)
    self.merged_adapters.extend(names)


@torch.no_grad()
def _fused_peft_unmerge(self):
    """peft's unmerge with the bit-exact inverse: merging again restores the merged weight bit for bit."""
    names = list(self.merged_adapters)
    if not names or not _plain_lora(self, names):
        return type(self).unmerge(self)
    weight = self.get_base_layer().weight
    for n in reversed(names):  # last merged, first off, as peft does
        ops.unmerge_(weight, *_adapter(self, n), backend=getattr(self, _MARK))
    self.merged_adapters.clear()


def patch(model: nn.Module, backend: str = "auto", *, target_modules: Optional[Iterable[str]] = None,
          r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0, use_rslora: bool = False) -> nn.Module:
    """Accelerate `model` in place and return it. See the module docstring for what is served."""
    peft_classes = _peft_linear_classes()
    fused, kept = 0, Counter()
    for _, m in model.named_modules():
        if type(m) in peft_classes:
            reason = _why_not_fusable(m)
            if reason is not None:
                kept[reason] += 1
                continue
            setattr(m, _MARK, backend)
            m.forward = types.MethodType(_fused_peft_forward, m)
            m.merge = types.MethodType(_fused_peft_merge, m)
            m.unmerge = types.MethodType(_fused_peft_unmerge, m)
            fused += 1
    if target_modules is not None:
        fused += _wrap_plain_linears(model, set(target_modules), backend, r, lora_alpha, lora_dropout, use_rslora)
    detail = "; ".join(f"{n} kept their own forward ({why})" for why, n in kept.items())
    log.info(f"lora_kernels.patch: {fused} layers fused (backend={backend})" + (f"; {detail}" if detail else ""))
    return model


def _wrap_plain_linears(model, names, backend, r, lora_alpha, lora_dropout, use_rslora) -> int:
    count = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child_name in names:
                layer = FusedLoRALinear.from_linear(child, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                                    use_rslora=use_rslora, backend=backend)
                setattr(parent, child_name, layer)
                count += 1
    return count


def unpatch(model: nn.Module, *, merge: bool = False) -> nn.Module:
    """Undo patch(): peft layers get their own forward back; FusedLoRALinear wrappers become nn.Linear again
    (their adapters folded into the weight when merge=True, dropped otherwise)."""
    for m in model.modules():
        if hasattr(m, _MARK):
            del m.forward, m.merge, m.unmerge
            delattr(m, _MARK)
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is FusedLoRALinear:
                if merge:
                    child.merge()
                elif child.merged:
                    child.unmerge()
                lin = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                device="meta")
                lin.weight = child.weight
                lin.bias = child.bias
                setattr(parent, child_name, lin)
    return model
