"""End-to-end LoRA fine-tune step of a ~1B Llama-architecture model (random init, nothing downloaded):
peft eager, peft + torch.compile, patched, patched + torch.compile; step time, activation memory, loss curves."""
from __future__ import annotations

import statistics
import time

import torch

import lora_kernels as lk

TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MiB = 1 << 20


def build(patched: bool, compiled: bool, config=None, seed=0, device="cuda", dtype=torch.bfloat16, backend="auto"):
    import peft
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**(config or TINYLLAMA))
    model = transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                       target_modules=TARGETS))
    if patched:
        lk.patch(model, backend=backend)
    model.train()
    fwd = torch.compile(model) if compiled else model
    params = [p for p in model.parameters() if p.requires_grad]
    return model, fwd, torch.optim.AdamW(params, lr=1e-4)


def _batches(n, batch, seq, vocab, seed=1, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), device=device, generator=g) for _ in range(n)]


def _step(fwd, opt, ids):
    loss = fwd(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def _dynamo_counts():
    from torch._dynamo.utils import counters
    return (sum(counters["graph_break"].values()), counters["stats"].get("unique_graphs", 0),
            sum(counters["recompiles"].values()) if "recompiles" in counters else 0)


def measure(name, patched, compiled, batch=2, seq=2048, steps=10, config=None, log=print, backend="auto"):
    """ms per step (wall, synchronised, after 3 warm-up steps), tokens/s, peak memory above the steady state,
    and for compiled variants the graph breaks, graphs and recompiles Dynamo counted over all steps."""
    if compiled:
        from torch._dynamo.utils import counters
        torch._dynamo.reset()
        counters.clear()
    model, fwd, opt = build(patched, compiled, config, backend=backend)
    data = _batches(steps + 3, batch, seq, model.config.vocab_size)
    for ids in data[:3]:                     # warm-up: compilation, optimizer state, allocator
        _step(fwd, opt, ids)
    torch.cuda.synchronize()
    graphs_after_warmup = _dynamo_counts()[1] if compiled else 0
    steady = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for ids in data[3:]:
        t0 = time.perf_counter()
        _step(fwd, opt, ids)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated() - steady
    # Activation memory: what the forward keeps for backward, above the steady state of params/grads/optimizer.
    before = torch.cuda.memory_allocated()
    loss = fwd(input_ids=data[0], labels=data[0]).loss
    kept = torch.cuda.memory_allocated() - before
    loss.backward()
    opt.zero_grad(set_to_none=True)
    breaks, graphs, recompiles = _dynamo_counts() if compiled else (0, 0, 0)
    p50 = statistics.median(times)
    row = dict(op="e2e", provider=name, mode="e2e", M=batch * seq, K=model.config.hidden_size, N=0, r=16,
               dtype="bfloat16", dropout=0.05, p20_ms=min(times), p50_ms=p50, p80_ms=max(times),
               tokens_per_s=batch * seq / p50 * 1e3, act_mib=kept / MiB, peak_mib=peak / MiB, timing="wall",
               graph_breaks=breaks, graphs=graphs, graphs_after_warmup=graphs - graphs_after_warmup,
               recompiles=recompiles)
    log(f"  e2e {name:16s} step {p50:.1f} ms ({row['tokens_per_s']:.0f} tok/s), activations {row['act_mib']:.0f} MiB, "
        f"peak {row['peak_mib']:.0f} MiB" + (f", graph breaks {breaks}, graphs {graphs} "
                                             f"(+{row['graphs_after_warmup']} after warm-up), recompiles {recompiles}"
                                             if compiled else ""))
    del model, fwd, opt
    torch.cuda.empty_cache()
    return row


def loss_curves(steps=200, batch=2, seq=2048, config=None, device="cuda", dtype=torch.bfloat16):
    """Loss per step of peft and of the patched model from the same initial weights and data. Dropout masks
    differ between the two (peft's comes from torch.nn.Dropout, ours from the counter hash), so the curves
    agree statistically, not bit for bit."""
    curves = {}
    for name, patched in (("peft", False), ("patched", True)):
        model, fwd, opt = build(patched, False, config, device=device, dtype=dtype)
        torch.manual_seed(123)
        data = _batches(steps, batch, seq, model.config.vocab_size, device=device)
        curves[name] = [float(_step(fwd, opt, ids)) for ids in data]
        del model, fwd, opt
        if device == "cuda":
            torch.cuda.empty_cache()
    return curves


VARIANTS = [("peft", False, False, "auto"), ("peft_compile", False, True, "auto"), ("patched", True, False, "auto"),
            ("patched_triton", True, False, "triton"), ("patched_compile", True, True, "auto")]


def run(log=print, steps_curve=200, config=None, compiled=True, variants=None):
    """compiled=False (the bench's --quick) leaves out the torch.compile variants, which take minutes."""
    chosen = [v for v in VARIANTS if (variants is None or v[0] in variants) and (compiled or not v[2])]
    rows = []
    for name, patched, comp, backend in chosen:
        if backend == "triton" and not lk.triton_available():
            continue
        rows.append(measure(name, patched, comp, config=config, log=log, backend=backend))
    base = rows[0]["p50_ms"]
    for row in rows:
        row["ratio"] = row["p50_ms"] / base
    curves = loss_curves(steps_curve, config=config) if steps_curve else None
    return rows, curves


def plot_curves(curves, path):
    from .report import pyplot, save
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, c in curves.items():
        ax.plot(c, label=name, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("LoRA fine-tune, same seed: peft vs patched")
    ax.legend()
    return save(fig, path)
