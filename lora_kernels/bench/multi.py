"""Mixed-adapter batches on the GPU: our bank vs the same rows on one adapter, and peft's mixed-batch forward
without and with lk.patch (which serves peft's `adapter_names=` by the same fused pass)."""
from __future__ import annotations

import torch

import lora_kernels as lk
from lora_kernels import multi

from . import providers as P
from .gpu import time_fn

CASES = [(64, 64), (64, 1), (8192, 16), (8192, 1)]     # (rows, distinct adapters)


def _peft_mixed(r, S, dtype, bank):
    layer = P.peft_lora_layer(bank.weight, r, 2 * r, adapters=S)
    if layer is None:
        return None
    with torch.no_grad():
        for s in range(S):
            layer.lora_A[f"a{s}"].weight.copy_(bank.lora_A[s, :r])
            layer.lora_B[f"a{s}"].weight.copy_(bank.lora_B[s, :, :r])
    return layer.to(dtype).eval()


def run(K=4096, N=4096, r=16, dtype=torch.bfloat16, log=print):
    rows_out = []
    bank = lk.LoRAAdapterBank(K, N, max_adapters=64, max_rank=r, bias=False, device="cuda", dtype=dtype)
    for s in range(64):
        bank.load_adapter(f"a{s}", torch.randn(r, K, device="cuda") / K**0.5,
                          torch.randn(N, r, device="cuda") / r**0.5, lora_alpha=2 * r)
    for M, S in CASES:
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        ids = (torch.arange(M, device="cuda") % S).to(torch.int32)
        names = [f"a{int(i)}" for i in ids.tolist()]
        fns = {"base": lambda: x @ bank.weight.t(),
               "triton": lambda: lk.multi_lora_linear(x, bank.weight, bank.lora_A, bank.lora_B, bank.scalings, ids,
                                                      backend="triton", check_ids=False)}
        peft_layer = _peft_mixed(r, S, dtype, bank) if M <= 64 or S <= 16 else None
        if peft_layer is not None:
            fns["peft_mixed"] = lambda: peft_layer(x, adapter_names=names)
            patched = lk.patch(_peft_mixed(r, S, dtype, bank))  # the same layer with lk.patch: one fused pass
            fns["patched_peft_mixed"] = lambda: patched(x, adapter_names=names)
        for name, fn in fns.items():
            with torch.no_grad():
                fn()
                (p20, p50, p80), how = time_fn(fn, M)
            rows_out.append(dict(op="multi_lora", provider=name, mode="multi", M=M, K=K, N=N, r=r, adapters=S,
                                 dtype=str(dtype).replace("torch.", ""), p20_ms=p20, p50_ms=p50, p80_ms=p80,
                                 act_mib=None, timing=how, dropout=0.0))
        rows_out += _train_rows(bank, x, ids, M, S, dtype, log)
    base = {(row["M"], row["adapters"]): row["p50_ms"] for row in rows_out if row["provider"] == "base"}
    one = {row["M"]: row["p50_ms"] for row in rows_out if row["provider"] == "triton" and row["adapters"] == 1}
    for row in rows_out:
        if row["mode"] != "multi":
            continue
        row["ratio"] = row["p50_ms"] / base[(row["M"], row["adapters"])]
        row["ratio_vs_one_adapter"] = row["p50_ms"] / one[row["M"]] if row["provider"] == "triton" else None
        log(f"  multi M={row['M']:5d} adapters={row['adapters']:3d} {row['provider']:11s} {row['p50_ms']:.4f} ms "
            f"ratio {row['ratio']:.3f}" + (f" vs one adapter {row['ratio_vs_one_adapter']:.3f}"
                                           if row["ratio_vs_one_adapter"] else ""))
    return rows_out


def _train_rows(bank, x, ids, M, S, dtype, log):
    """Training step through a mixed batch (forward + backward, x needing its gradient), its backward once as
    slot-blocked GEMMs and once as the loop over the slots present; ratio to base forward + dx in the same run."""
    K, N, r = bank.in_features, bank.out_features, bank.max_rank
    xg = x.detach().clone().requires_grad_()
    A, B = bank.lora_A.detach().clone().requires_grad_(), bank.lora_B.detach().clone().requires_grad_()
    dy = torch.randn(M, N, device="cuda", dtype=dtype)
    w = bank.weight

    def base():
        (xg @ w.t()).backward(dy)

    def step():
        lk.multi_lora_linear(xg, w, A, B, bank.scalings, ids, backend="triton", check_ids=False).backward(dy)

    def step_slot_loop():
        limit = multi.MAX_BLOCKED_COLUMNS
        multi.MAX_BLOCKED_COLUMNS = 0
        try:
            step()
        finally:
            multi.MAX_BLOCKED_COLUMNS = limit

    out = []
    for name, fn in (("base_train", base), ("triton_train", step), ("triton_train_slot_loop", step_slot_loop)):
        fn()
        (p20, p50, p80), how = time_fn(fn, M, grads=[xg, A, B], graphs=False)
        out.append(dict(op="multi_lora", provider=name, mode="multi_train", M=M, K=K, N=N, r=r, adapters=S,
                        dtype=str(dtype).replace("torch.", ""), p20_ms=p20, p50_ms=p50, p80_ms=p80, act_mib=None,
                        timing=how, dropout=0.0, ratio_vs_one_adapter=None))
    for row in out:
        row["ratio"] = row["p50_ms"] / out[0]["p50_ms"]
        log(f"  multi train M={M:5d} adapters={S:3d} {row['provider']:22s} {row['p50_ms']:.4f} ms "
            f"ratio {row['ratio']:.3f}")
    return out
