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


def _quantize_targets_4bit(model, device, dtype):
    """QLoRA's base: every target nn.Linear replaced by a bitsandbytes NF4 Linear4bit (blocks of 64,
    double-quantised absmax, computing in dtype), as BitsAndBytesConfig(load_in_4bit=True) would load it."""
    import bitsandbytes as bnb
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and name in TARGETS:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      quant_type="nf4", compress_statistics=True, compute_dtype=dtype)
                q.weight = bnb.nn.Params4bit(child.weight.detach().float().cpu(), requires_grad=False,
                                             quant_type="nf4", compress_statistics=True, blocksize=64)
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.detach().cpu(), requires_grad=False)
                setattr(parent, name, q.to(device))
    return model


def build(patched: bool, compiled: bool, config=None, seed=0, device="cuda", dtype=torch.bfloat16, backend="auto",
          four_bit=False, lr=1e-4):
    import peft
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**(config or TINYLLAMA))
    model = transformers.LlamaForCausalLM(cfg).to(dtype=dtype)
    if four_bit:  # the targets are quantised and moved one by one; the rest of the model follows
        model = _quantize_targets_4bit(model, device, dtype)
    model = model.to(device)
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                       target_modules=TARGETS))
    if patched:
        lk.patch(model, backend=backend)
    model.train()
    fwd = torch.compile(model) if compiled else model
    params = [p for p in model.parameters() if p.requires_grad]
    return model, fwd, torch.optim.AdamW(params, lr=lr)


def _batches(n, batch, seq, vocab, seed=1, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), device=device, generator=g) for _ in range(n)]


def _learnable_batches(n, batch, seq, vocab, seed=1, device="cuda", symbols=256, noise=0.1):
    """Token streams a LoRA can learn within a few hundred steps, so the curves show training, not noise:
    each sequence walks a fixed cycle through `symbols` token ids from a random start, and a `noise` share of
    positions holds a random one of those ids instead."""
    g = torch.Generator(device=device).manual_seed(seed)
    symbols = min(symbols, vocab)
    ids = torch.randperm(vocab, device=device, generator=g)[:symbols]
    out = []
    for _ in range(n):
        start = torch.randint(0, symbols, (batch, 1), device=device, generator=g)
        walk = (start + torch.arange(seq, device=device)) % symbols
        noisy = torch.rand(batch, seq, device=device, generator=g) < noise
        walk = torch.where(noisy, torch.randint(0, symbols, (batch, seq), device=device, generator=g), walk)
        out.append(ids[walk])
    return out


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


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


class _Provider:
    """One e2e provider held in memory for the whole run, so the providers' timed steps can be interleaved."""

    def __init__(self, name, patched, compiled, backend, batch, seq, config, device, dtype, warmup=3, four_bit=False):
        self.name, self.compiled, self.device = name, compiled, device
        before = _dynamo_counts()
        self.model, self.fwd, self.opt = build(patched, compiled, config, device=device, dtype=dtype, backend=backend,
                                               four_bit=four_bit)
        self.data = _batches(warmup + 1, batch, seq, self.model.config.vocab_size, device=device)
        for ids in self.data[:warmup]:      # warm-up: compilation, optimizer state, allocator
            _step(self.fwd, self.opt, ids)
        _sync(device)
        after = _dynamo_counts()
        # Dynamo's counters are global: each provider gets what changed while it compiled / ran.
        self.breaks = after[0] - before[0] if compiled else 0
        self.graphs = after[1] - before[1] if compiled else 0
        self.new_graphs = self.recompiles = 0
        self.times, self.round_medians, self.peak = [], [], 0

    def timed_round(self, steps):
        before = _dynamo_counts()
        base = torch.cuda.memory_allocated() if self.device == "cuda" else 0
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            _step(self.fwd, self.opt, self.data[-1])
            _sync(self.device)
            times.append((time.perf_counter() - t0) * 1e3)
        if self.device == "cuda":
            self.peak = max(self.peak, torch.cuda.max_memory_allocated() - base)
        after = _dynamo_counts()
        if self.compiled:
            self.new_graphs += after[1] - before[1]
            self.recompiles += after[2] - before[2]
        self.times += times
        self.round_medians.append(statistics.median(times))

    def activations(self):
        """What the forward keeps for backward, above the steady state of params / grads / optimizer."""
        if self.device != "cuda":
            return 0
        before = torch.cuda.memory_allocated()
        loss = self.fwd(input_ids=self.data[0], labels=self.data[0]).loss
        kept = torch.cuda.memory_allocated() - before
        loss.backward()
        self.opt.zero_grad(set_to_none=True)
        return kept


def measure(variants, batch=2, seq=2048, rounds=6, steps=5, config=None, log=print, device="cuda",
            dtype=torch.bfloat16):
    """Every provider built and warmed up first, then `rounds` rounds in which each runs `steps` timed steps
    in turn: a slow spell of the host (which bounds eager steps) then falls on all providers alike. Per
    provider: the median ms per step over all rounds (wall, synchronised), tokens/s, peak memory above the
    steady state, the ratio to the first provider per round (its spread), and for compiled providers the
    graph breaks, graphs and recompiles Dynamo counted (recompiles and new graphs during the timed rounds)."""
    if any(v[2] for v in variants):
        from torch._dynamo.utils import counters
        torch._dynamo.reset()
        counters.clear()
    providers = [_Provider(name, patched, comp, backend, batch, seq, config, device, dtype,
                           four_bit=name.startswith("qlora"))
                 for name, patched, comp, backend in variants]
    for _ in range(rounds):
        for p in providers:
            p.timed_round(steps)
    rows = []
    first = providers[0]
    for p in providers:
        q = statistics.quantiles(p.times, n=5) if len(p.times) > 1 else p.times * 4
        p50 = statistics.median(p.times)
        per_round = [f / m for f, m in zip(first.round_medians, p.round_medians)]  # speed-up over the first
        row = dict(op="e2e", provider=p.name, mode="e2e", M=batch * seq, K=p.model.config.hidden_size, N=0, r=16,
                   dtype=str(dtype).replace("torch.", ""), dropout=0.05, p20_ms=q[0], p50_ms=p50, p80_ms=q[-1],
                   rounds=rounds, steps_per_round=steps, ratio=p50 / statistics.median(first.times),
                   speedup_min=min(per_round), speedup_max=max(per_round),
                   tokens_per_s=batch * seq / p50 * 1e3, act_mib=p.activations() / MiB, peak_mib=p.peak / MiB,
                   timing="wall, interleaved", graph_breaks=p.breaks, graphs=p.graphs,
                   graphs_after_warmup=p.new_graphs, recompiles=p.recompiles)
        rows.append(row)
        log(f"  e2e {p.name:16s} step {p50:.1f} ms ({row['tokens_per_s']:.0f} tok/s), x{1 / row['ratio']:.3f} vs "
            f"{first.name} (per round {row['speedup_min']:.3f}-{row['speedup_max']:.3f}), activations "
            f"{row['act_mib']:.0f} MiB, peak {row['peak_mib']:.0f} MiB"
            + (f", graph breaks {p.breaks}, graphs {p.graphs} (+{p.new_graphs} in timed rounds), "
               f"recompiles in timed rounds {p.recompiles}" if p.compiled else ""))
    del providers
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def loss_curves(steps=200, batch=2, seq=2048, config=None, device="cuda", dtype=torch.bfloat16):
    """Loss per step of peft and of the patched model from the same initial weights and data. Dropout masks
    differ between the two (peft's comes from torch.nn.Dropout, ours from the counter hash), so the curves
    agree statistically, not bit for bit."""
    curves = {}
    for name, patched in (("peft", False), ("patched", True)):
        model, fwd, opt = build(patched, False, config, device=device, dtype=dtype, lr=1e-3)
        torch.manual_seed(123)
        data = _learnable_batches(steps, batch, seq, model.config.vocab_size, device=device)
        curves[name] = [float(_step(fwd, opt, ids).detach()) for ids in data]
        del model, fwd, opt
        if device == "cuda":
            torch.cuda.empty_cache()
    return curves


VARIANTS = [("peft", False, False, "auto"), ("peft_compile", False, True, "auto"), ("patched", True, False, "auto"),
            ("patched_triton", True, False, "triton"), ("patched_compile", True, True, "auto"),
            # QLoRA: the same model with its target linears in NF4 (bitsandbytes), peft's layers vs patched
            ("qlora_peft", False, False, "auto"), ("qlora_patched", True, False, "auto")]
DEFAULT_VARIANTS = ["peft", "peft_compile", "patched", "patched_triton", "patched_compile"]


def warmed(names, warm=3):
    """{variant name: (fwd, opt, batches)} for the VARIANTS named, each built (the default shape, 2×2048 tokens)
    and run for `warm` steps (compilation, autotuning, first calls) on four fixed batches: the profiling and
    A/B scripts' start (bench/e2e_profile.py, bench/compiled_step.py)."""
    built = {}
    for name, patched, compiled, backend in [v for v in VARIANTS if v[0] in names]:
        model, fwd, opt = build(patched, compiled, backend=backend)
        data = _batches(4, 2, 2048, model.config.vocab_size)
        for ids in data[:warm]:
            _step(fwd, opt, ids)
        _sync("cuda")
        built[name] = (fwd, opt, data)
    return built


def run(log=print, steps_curve=200, config=None, compiled=True, variants=None, rounds=6, steps=5):
    """compiled=False (the bench's --quick) leaves out the torch.compile variants, which take minutes."""
    variants = variants or DEFAULT_VARIANTS  # the QLoRA pair only when asked for (--e2e-variants)
    chosen = [v for v in VARIANTS if v[0] in variants and (compiled or not v[2])
              and not (v[3] == "triton" and not lk.triton_available())]
    rows = measure(chosen, config=config, log=log, rounds=rounds, steps=steps)
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
