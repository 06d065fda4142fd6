"""4-bit (NF4) base: our fused 4-bit LoRA forward vs the bf16 cuBLAS GEMM, and vs peft LoRA over a
bitsandbytes Linear4bit where bitsandbytes is installed."""
from __future__ import annotations

import torch
from torch import nn

from lora_kernels import nf4
from . import providers as P
from .gpu import time_fn

SHAPES = [(4096, 4096), (4096, 14336)]
MS = [1, 4, 8, 16, 8192]


def _bnb_peft(weight, r):
    try:
        import bitsandbytes as bnb
        import peft
    except Exception:  # noqa: BLE001
        return None
    N, K = weight.shape
    holder = P._Holder(bnb.nn.Linear4bit(K, N, bias=False, quant_type="nf4", compress_statistics=True,
                                         compute_dtype=torch.bfloat16))
    holder.proj.weight = bnb.nn.Params4bit(weight.float().cpu(), requires_grad=False, quant_type="nf4",
                                           compress_statistics=True, blocksize=64)
    holder = holder.to("cuda")
    model = peft.get_peft_model(holder, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"]))
    return model.base_model.model.proj.to(torch.bfloat16).eval()


def run(r=16, log=print):
    rows = []
    for K, N in SHAPES:
        w = (torch.randn(N, K, device="cuda") / K**0.5).to(torch.bfloat16)
        layer = nf4.FusedLoRALinear4bit.from_linear(nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16),
                                                    r=r, lora_alpha=2 * r, backend="triton")
        nn.init.normal_(layer.lora_B, std=0.02)
        bnb_layer = _bnb_peft(w, r)
        for M in MS:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            fns = {"base": lambda: x @ w.t(), "triton": lambda: layer(x)}
            if M <= nf4.EXTENSION_DECODE_MAX_ROWS:  # the extension's decode kernel, and auto's timed pick
                for be in ("cuda", "auto"):
                    fns[be] = lambda be=be: nf4.lora4_linear(x, layer.qweight, layer.lora_A, layer.lora_B,
                                                             layer.scaling, backend=be)
            if M <= 64:
                fns.update(triton_gemm=P.forced("LORA_KERNELS_DECODE", "gemm", fns["triton"]),
                           triton_splitk=P.forced("LORA_KERNELS_DECODE", "splitk", fns["triton"]))
                if M <= 4:  # the multiply-add partials (splitk.GEMV_MAX_ROWS)
                    fns["triton_gemv"] = P.forced("LORA_KERNELS_DECODE", "gemv", fns["triton"])
            else:
                fns.update(triton_tiled=P.forced("LORA_KERNELS_NF4", "tiled", fns["triton"]),
                           triton_dense=P.forced("LORA_KERNELS_NF4", "dense", fns["triton"]))
            if bnb_layer is not None:
                fns["bnb_peft"] = lambda: bnb_layer(x)
            base_ms = None
            for name, fn in fns.items():
                try:
                    with torch.no_grad():
                        fn()
                        (p20, p50, p80), how = time_fn(fn, M)
                except Exception as e:  # noqa: BLE001 - keep the other providers' figures
                    log(f"  nf4 M={M} {K}x{N} {name}: failed: {type(e).__name__}: {str(e)[:200]}")
                    continue
                base_ms = base_ms or p50
                rows.append(dict(op="lora4_linear", provider=name, mode="nf4", M=M, K=K, N=N, r=r, dtype="bfloat16",
                                 dropout=0.0, p20_ms=p20, p50_ms=p50, p80_ms=p80, act_mib=None, timing=how,
                                 ratio=p50 / base_ms, weight_bytes_per_param=layer.qweight.nbytes() / (N * K)))
                log(f"  nf4 M={M:5d} {K}x{N} {name:9s} {p50:.4f} ms ratio to bf16 cuBLAS {p50 / base_ms:.3f}")
    return rows
