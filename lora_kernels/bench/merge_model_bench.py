"""Whole-model merge on the GPU: a Llama-2-7B-shaped set of adapted linears (q,k,v,o,gate,up,down per block),
merged and unmerged by merge_model (grouped launches) vs one launch per layer vs peft's per-layer add, each over
the time to copy every adapted weight once."""
from __future__ import annotations

import torch
from torch import nn
from triton.testing import do_bench

import lora_kernels as lk

SHAPES = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
          "gate_proj": (4096, 11008), "up_proj": (4096, 11008), "down_proj": (11008, 4096)}


def _model(blocks, r, dtype):
    layers = nn.ModuleList()
    for _ in range(blocks):
        for k, n in SHAPES.values():
            m = lk.FusedLoRALinear(k, n, r=r, lora_alpha=2 * r, bias=False, init_lora_weights=False,
                                   device="cuda", dtype=dtype)
            with torch.no_grad():
                m.weight.normal_(0, 0.02)
                m.lora_A.normal_(0, k**-0.5)
                m.lora_B.normal_(0, r**-0.5)
            layers.append(m)
    return layers


def _both(merge, unmerge):
    def fn():  # one merge and one unmerge: the weights end where they started (bit-exact), the cost halves
        merge()
        unmerge()
    return fn


def run(quick=False, r=16, dtype=torch.bfloat16, log=print, blocks=None):
    blocks = blocks or (8 if quick else 32)
    layers = _model(blocks, r, dtype)
    scratch = {m.weight.shape: torch.empty_like(m.weight) for m in layers}

    def copy_all():
        for m in layers:
            scratch[m.weight.shape].copy_(m.weight)

    def per_layer(backend):
        def go(fn):
            return lambda: [fn(m.weight, m.lora_A, m.lora_B, m.scaling, backend=backend) for m in layers]
        return _both(go(lk.merge_), go(lk.unmerge_))

    def peft_like(sign):
        return lambda: [m.weight.add_(sign * (m.lora_B @ m.lora_A * m.scaling).to(dtype)) for m in layers]

    fns = {"copy": copy_all, "grouped": _both(lambda: lk.merge_model(layers), lambda: lk.unmerge_model(layers)),
           "per_layer_triton": per_layer("triton"), "peft": _both(peft_like(1), peft_like(-1))}
    if lk.cuda_ext_available():
        fns["per_layer_cuda"] = per_layer("cuda")
    rows = []
    with torch.no_grad():
        for name, fn in fns.items():
            p20, p50, p80 = do_bench(fn, warmup=3, rep=300, quantiles=[0.2, 0.5, 0.8])
            if name != "copy":  # fn did a merge and an unmerge
                p20, p50, p80 = p20 / 2, p50 / 2, p80 / 2
            rows.append(dict(provider=name, p20_ms=p20, p50_ms=p50, p80_ms=p80, timing="events"))
    copy = rows[0]["p50_ms"]
    for row in rows:
        row.update(op="merge_model", mode="merge_model", M=len(layers), K=4096, N=11008, r=r,
                   dtype=str(dtype).replace("torch.", ""), dropout=0.0, act_mib=None, ratio=row["p50_ms"] / copy)
        log(f"  merge_model {len(layers)} layers {row['provider']:16s} {row['p50_ms']:.3f} ms  "
            f"x{row['ratio']:.3f} of copying every weight once")
    return rows
