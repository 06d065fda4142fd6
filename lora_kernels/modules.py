"""FusedLoRALinear: a drop-in LoRA linear layer whose forward and backward are one fused op."""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
from torch import nn

from . import ops
from ._checks import check_dropout


class FusedLoRALinear(nn.Module):
    """y = x·Wᵀ + b + s·B(A·dropout(x)), s = lora_alpha/r (or lora_alpha/√r with use_rslora).

    W and b are frozen; lora_A (r, in) and lora_B (out, r) train. Initialised as peft does:
    "kaiming" (A kaiming-uniform with a=√5, B zeros) or "gaussian" (A ~ N(0, 1/r), B zeros).
    """

    def __init__(self, in_features: int, out_features: int, r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, bias: bool = True, use_rslora: bool = False,
                 init_lora_weights="kaiming", device=None, dtype=None, backend: str = "auto"):
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features/out_features: expected >= 1, got {in_features}, {out_features}")
        factory = {"device": device, "dtype": dtype}
        self._configure(in_features, out_features, r, lora_alpha, lora_dropout, use_rslora, backend)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None
        self._init_base()
        self._make_adapters(factory, init_lora_weights)

    def _configure(self, in_features, out_features, r, lora_alpha, lora_dropout, use_rslora, backend):
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"r: expected an int >= 1, got {r!r}")
        check_dropout(lora_dropout)
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.lora_alpha, self.lora_dropout, self.use_rslora = lora_alpha, float(lora_dropout), use_rslora
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.backend, self.merged, self._adapters_enabled = backend, False, True

    def _make_adapters(self, factory, init_lora_weights):
        if init_lora_weights not in ("kaiming", "gaussian", True, False):
            raise ValueError(f"init_lora_weights: expected 'kaiming', 'gaussian', True or False, "
                             f"got {init_lora_weights!r}")
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, self.r, **factory))
        self.reset_lora_parameters(init_lora_weights)

    def _init_base(self):
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights="kaiming"):
        if init_lora_weights is False:
            return
        if init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    use_rslora: bool = False, init_lora_weights="kaiming", backend: str = "auto",
                    adapter_dtype: Optional[torch.dtype] = None) -> "FusedLoRALinear":
        """Wrap an nn.Linear, sharing (not copying) its weight and bias tensors; they become frozen."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        mod = cls.__new__(cls)
        nn.Module.__init__(mod)
        mod._configure(linear.in_features, linear.out_features, r, lora_alpha, lora_dropout, use_rslora, backend)
        w.requires_grad_(False)
        mod.weight = w
        if linear.bias is not None:
            linear.bias.requires_grad_(False)
        mod.bias = linear.bias
        mod._make_adapters({"device": w.device, "dtype": adapter_dtype or w.dtype}, init_lora_weights)
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self._adapters_enabled:
            if self.merged and not self._adapters_enabled:
                raise RuntimeError("disable_adapters() on a merged layer: unmerge() first")
            return nn.functional.linear(x, self.weight, self.bias)
        p = self.lora_dropout if self.training else 0.0
        return ops.lora_linear(x, self.weight, self.lora_A, self.lora_B, self.scaling, self.bias,
                               dropout_p=p, backend=self.backend)

    @torch.no_grad()
    def merge(self):
        """Fold s·B·A into W (forward becomes the plain GEMM). A no-op when already merged."""
        if not self.merged:
            ops.merge_(self.weight, self.lora_A, self.lora_B, self.scaling, backend=self.backend)
            self.merged = True
        return self

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            ops.unmerge_(self.weight, self.lora_A, self.lora_B, self.scaling, backend=self.backend)
            self.merged = False
        return self

    @contextlib.contextmanager
    def disable_adapters(self):
        """Run the base layer only inside the block (unmerged layers only)."""
        if self.merged:
            raise RuntimeError("disable_adapters() on a merged layer: unmerge() first")
        prev, self._adapters_enabled = self._adapters_enabled, False
        try:
            yield self
        finally:
            self._adapters_enabled = prev

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, dropout={self.lora_dropout}, "
                f"bias={self.bias is not None}, rslora={self.use_rslora}, merged={self.merged}, "
                f"backend={self.backend!r}, adapter_dtype={self.lora_A.dtype}")
