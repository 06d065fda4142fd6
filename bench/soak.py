"""Soak: many training steps of a small patched model with allocated memory recorded at the start and the
end, then many merge/unmerge cycles checking bit-exact re-merge and bounded drift. Writes one JSON file.

    python bench/soak.py --steps 10000 --cycles 10000 --out soak.json [--device cuda] [--backend auto]
"""
import argparse
import json
import time

import torch
from torch import nn

import lora_kernels as lk


def train_soak(steps, device, backend, dtype):
    torch.manual_seed(0)
    layers = [lk.FusedLoRALinear(256, 256, r=16, lora_alpha=32, lora_dropout=0.05, device=device, dtype=dtype,
                                 backend=backend) for _ in range(4)]
    model = nn.Sequential(*[m for layer in layers for m in (layer, nn.GELU())])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randn(512, 256, device=device, dtype=dtype)
    target = torch.randn(512, 256, device=device, dtype=dtype)
    mem = []
    loss = None
    for step in range(steps):
        loss = (model(x).float() - target.float()).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step in (10, steps - 1) and device == "cuda":
            torch.cuda.synchronize()
            mem.append(torch.cuda.memory_allocated())
    return dict(steps=steps, final_loss=float(loss), allocated_after_step10=mem[0] if mem else None,
                allocated_at_end=mem[-1] if mem else None, flat=(len(mem) == 2 and mem[0] == mem[1]) or None)


def merge_soak(cycles, device, backend):
    out = {}
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        torch.manual_seed(1)
        w = torch.randn(1024, 1024, device=device).to(dtype)
        a = torch.randn(16, 1024, device=device) / 32
        b = torch.randn(1024, 16, device=device)
        w0 = w.clone()
        lk.merge_(w, a, b, 2.0, backend=backend)
        merged = w.clone()
        bitexact = True
        for _ in range(cycles):
            lk.unmerge_(w, a, b, 2.0, backend=backend)
            lk.merge_(w, a, b, 2.0, backend=backend)
            bitexact &= bool(torch.equal(w, merged))
        lk.unmerge_(w, a, b, 2.0, backend=backend)
        ulp = torch.finfo(dtype).eps * torch.maximum(w0.float().abs(), merged.float().abs())
        drift = (w.float() - w0.float()).abs()
        out[str(dtype)] = dict(cycles=cycles, remerge_bit_exact_every_cycle=bitexact,
                               max_abs_drift=float(drift.max()), max_drift_in_ulps=float((drift / ulp).max()))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10000)
    ap.add_argument("--cycles", type=int, default=10000)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--out", default="soak.json")
    args = ap.parse_args()
    t0 = time.time()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    res = dict(device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu", backend=args.backend,
               torch=torch.__version__, train=train_soak(args.steps, args.device, args.backend, dtype),
               merge=merge_soak(args.cycles, args.device, args.backend))
    res["seconds"] = time.time() - t0
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
