"""The ways of computing one LoRA linear that the benchmark puts side by side.

Each provider builds a callable `forward(x) -> y` over shared tensors W, A, B, so every provider
computes the same function on the same data.
"""
from __future__ import annotations

import os

import torch
from torch import nn

import lora_kernels as lk


class Problem:
    """One LoRA linear's tensors: W (N×K) frozen, A (r×K), B (N×r) trainable, s = 2 (alpha = 2r)."""

    def __init__(self, M, K, N, r, dtype, device, dropout_p=0.0, adapter_dtype=None):
        g = torch.Generator(device=device).manual_seed(M * 7 + K * 3 + N + r)
        self.M, self.K, self.N, self.r, self.dtype, self.p = M, K, N, r, dtype, dropout_p
        ad = adapter_dtype or dtype
        self.weight = (torch.randn(N, K, device=device, generator=g) / K**0.5).to(dtype)
        self.lora_A = (torch.randn(r, K, device=device, generator=g) / K**0.5).to(ad).requires_grad_()
        self.lora_B = (torch.randn(N, r, device=device, generator=g) / r**0.5).to(ad).requires_grad_()
        self.scaling = 2.0
        self.x = torch.randn(M, K, device=device, generator=g).to(dtype)


class _Holder(nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.proj = linear


def peft_lora_layer(weight: torch.Tensor, r: int, lora_alpha: float, dropout: float = 0.0, adapters: int = 1):
    """peft's LoRA Linear around a frozen nn.Linear holding `weight`, built through peft's public API
    (get_peft_model / add_adapter) so that it does not depend on the layer's constructor signature.
    Returns None where peft is not installed."""
    try:
        import peft
    except Exception:  # noqa: BLE001
        return None
    N, K = weight.shape
    base = nn.Linear(K, N, bias=False, device=weight.device, dtype=weight.dtype)
    base.weight = nn.Parameter(weight, requires_grad=False)
    cfg = peft.LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=dropout, target_modules=["proj"])
    model = peft.get_peft_model(_Holder(base), cfg, adapter_name="a0")
    for s in range(1, adapters):
        model.add_adapter(f"a{s}", cfg)
    return model.base_model.model.proj


def _peft_module(pb: Problem):
    """peft's LoRA Linear holding the same W, A and B (None if peft is absent)."""
    layer = peft_lora_layer(pb.weight, pb.r, pb.scaling * pb.r, pb.p)
    if layer is None:
        return None
    with torch.no_grad():
        layer.lora_A["a0"].weight.copy_(pb.lora_A)
        layer.lora_B["a0"].weight.copy_(pb.lora_B)
    return layer.to(pb.dtype)


def _addmm(pb: Problem):
    def fwd(x):
        y = x @ pb.weight.t()
        xa = nn.functional.dropout(x, pb.p) @ pb.lora_A.t() if pb.p > 0 else x @ pb.lora_A.t()
        return y.addmm_(xa, pb.lora_B.t(), alpha=pb.scaling)
    return fwd


def forced(var, path, fn):
    """fn with one path forced through the environment variable var (LORA_KERNELS_DECODE, LORA_KERNELS_NF4,
    LORA_KERNELS_GEMM), so a bench row can show each path next to the one chosen."""
    def run(*args):
        before = os.environ.get(var)
        os.environ[var] = path
        try:
            return fn(*args)
        finally:
            os.environ.pop(var) if before is None else os.environ.update({var: before})
    return run


def build(name: str, pb: Problem):
    """A forward callable for provider `name`, or None where it cannot run here."""
    if name == "base":
        return lambda x: x @ pb.weight.t()
    if name in ("peft", "peft_compile"):
        layer = _peft_module(pb)
        if layer is None:
            return None
        layer.train(pb.p > 0)
        return torch.compile(layer) if name == "peft_compile" else layer
    if name == "addmm":
        return _addmm(pb)
    if name in ("triton", "cuda", "auto"):
        if name == "triton" and not lk.triton_available():
            return None
        if name == "cuda" and not lk.cuda_ext_available():
            return None
        if name == "auto" and not (lk.triton_available() or lk.cuda_ext_available()):
            return None
        return lambda x: lk.lora_linear(x, pb.weight, pb.lora_A, pb.lora_B, pb.scaling, dropout_p=pb.p,
                                        backend=name)
    if name in FORCED_FEEDS:
        fwd = build("triton", pb)
        return None if fwd is None else forced("LORA_KERNELS_GEMM", FORCED_FEEDS[name], fwd)
    raise ValueError(f"unknown provider {name!r}")


# auto: what a user gets by default (the faster backend per shape and mode, measured on its first call)
PROVIDERS = ("base", "peft", "peft_compile", "addmm", "triton", "cuda", "auto")
# On request (--providers): the Triton backend with its GEMM's feed forced (pointer loads or TMA descriptors)
FORCED_FEEDS = {"triton_pointers": "pointers", "triton_tma": "tma"}
