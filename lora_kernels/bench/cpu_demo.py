"""What the benchmark does on a machine with no GPU: agreement checks and a short LoRA fine-tune."""
from __future__ import annotations

import os

import torch
from torch import nn

import lora_kernels as lk
from lora_kernels import reference


def agreement(log=print):
    """Fused op (torch backend, and the Triton kernels under the interpreter when enabled) vs float64."""
    backends = ["torch"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
    worst = 0.0
    for backend in backends:
        for (M, K, N, r, p) in [(17, 70, 45, 8, 0.0), (33, 64, 96, 16, 0.1), (5, 130, 40, 3, 0.0)]:
            g = torch.Generator().manual_seed(M + K + N + r)
            x = torch.randn(M, K, generator=g, requires_grad=True)
            w = torch.randn(N, K, generator=g) / K**0.5
            a = (torch.randn(r, K, generator=g) / K**0.5).requires_grad_()
            b = torch.randn(N, r, generator=g).requires_grad_()
            torch.manual_seed(0)
            y = lk.lora_linear(x, w, a, b, 0.5, dropout_p=p, backend=backend)
            y.square().sum().backward()
            got = [y.detach(), x.grad, a.grad, b.grad]
            torch.manual_seed(0)
            seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64) if p > 0 else None
            leaves = [t.detach().double().requires_grad_() for t in (x, a, b)]
            y64 = reference.lora_linear(leaves[0], w.double(), leaves[1], leaves[2], 0.5, dropout_p=p, seed=seed)
            y64.square().sum().backward()
            exact = [y64.detach()] + [t.grad for t in leaves]
            rel = max(((u.double() - e).norm() / e.norm()).item() for u, e in zip(got, exact))
            worst = max(worst, rel)
            log(f"  {backend:6s} M={M:<3} K={K:<3} N={N:<3} r={r:<2} dropout={p:<4} "
                f"max relative error of y, dx, dA, dB vs float64: {rel:.2e}")
    return worst


class TinyModel(nn.Module):
    """A small built-in MLP classifier; its linear layers get LoRA adapters."""

    def __init__(self, d_in=32, d_hidden=128, n_cls=10):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_hidden)
        self.head = nn.Linear(d_hidden, n_cls)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def finetune(steps=150, log=print):
    """Freeze a random base model, add LoRA (r=8) to its hidden layers, fit a new labelling."""
    torch.manual_seed(0)
    model = TinyModel()
    for name in ("fc1", "fc2"):
        setattr(model, name, lk.FusedLoRALinear.from_linear(getattr(model, name), r=8, lora_alpha=16,
                                                            lora_dropout=0.05, backend="torch"))
    for p in model.head.parameters():
        p.requires_grad_(False)
    x = torch.randn(2048, 32)
    teacher = TinyModel()
    labels = teacher(x).argmax(-1)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for step in range(steps):
        idx = torch.randint(0, x.shape[0], (256,))
        loss = nn.functional.cross_entropy(model(x[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 30 == 0 or step == steps - 1:
            log(f"  step {step:4d}  loss {loss.item():.4f}")
    n_train = sum(p.numel() for p in params)
    n_all = sum(p.numel() for p in model.parameters())
    log(f"  trainable parameters: {n_train} of {n_all}")
    return losses


def run(log=print):
    log("No CUDA GPU here: running the CPU demo (timings need a GPU).")
    log("1) Fused LoRA op vs the float64 reference:")
    worst = agreement(log)
    log("2) LoRA fine-tune of a small built-in model (base frozen):")
    losses = finetune(log=log)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    log(f"  mean loss of the first 10 steps {first:.4f} -> last 10 steps {last:.4f}")
    ok = worst < 1e-4 and last < first
    log("CPU demo " + ("passed" if ok else "FAILED") + ". Run on a machine with a CUDA GPU for timings.")
    return ok
