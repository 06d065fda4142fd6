"""`backend="auto"` for the fused linear where both GPU backends are built: the faster one per shape and mode.

Neither backend wins everywhere (the CUDA extension's cuBLAS composition costs less host time per call; the
Triton kernels keep the dropout mask in registers and read x once), so the first eager call of each shape
and mode (forward only, or forward + backward when a gradient is needed) times calls of each on the same
tensors, each after the L2 cache is overwritten (measured.cold_ms, as the bench times them), and the faster
serves that key from then on (`LORA_KERNELS_AUTO=cuda|triton` forces one). The timing leaves no trace: it
runs on detached views, takes gradients with autograd.grad (nothing is accumulated) and restores the random generators, so dropout masks drawn later are those of an untimed run.
Nothing is timed inside CUDA-graph capture, sync-debug mode or a backward pass (an activation-checkpoint
recompute): those take the CUDA backend until the key is decided. Forward-only keys also get a second pick,
by GPU time alone, which CUDA-graph captures take: a replay has no host time, and at 16 rows the Triton
split-K path ran in 12 µs of GPU time against the extension's 18 µs while losing the eager (host-bound) timing.
torch.compile keeps the CUDA ops.
"""
from __future__ import annotations

import torch

from . import _backends

ENV = "LORA_KERNELS_AUTO"
DEFAULT = "cuda"


def _key(x, weight, lora_A, lora_B, bias, dropout_p, training):
    from .triton import configs
    rows = x.numel() // max(x.shape[-1], 1)
    return ("auto linear", x.device, configs.m_bucket(rows), tuple(weight.shape), lora_A.shape[0], x.dtype,
            lora_A.dtype, lora_B.dtype, bias is not None, dropout_p > 0.0, training)


def _graph_key(key):
    return ("auto linear, CUDA graph",) + key[1:]


def _one_call(linear, backend, x, weight, lora_A, lora_B, bias, scaling, dropout_p, training):
    """One call of `linear` with `backend` on detached views of the inputs (and its gradients if training)."""
    views = [t.detach().requires_grad_(t.requires_grad and training) for t in (x, lora_A, lora_B)]
    wanted = [v for v in views if v.requires_grad]

    def run():
        y = linear(views[0], weight, views[1], views[2], scaling, bias, dropout_p=dropout_p, backend=backend)
        if wanted:
            torch.autograd.grad(y, wanted, torch.ones_like(y))
    return run


def linear_backend(linear, x, weight, lora_A, lora_B, bias, scaling: float, dropout_p: float) -> str:
    """'cuda' or 'triton' for this call (x (..., K) on a GPU, both backends built, eager mode)."""
    from .triton import measured
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (x, lora_A, lora_B))
    key = _key(x, weight, lora_A, lora_B, bias, dropout_p, training)
    capturing = torch.cuda.is_current_stream_capturing()
    if capturing:
        # A CUDA graph replays kernels without their host time, so it takes the pick by GPU time, made
        # beside the eager pick on the first eager call (graphs are captured after an eager warm-up).
        return (measured.decided(_graph_key(key), ENV, ("cuda", "triton"))
                or measured.decided(key, ENV, ("cuda", "triton")) or DEFAULT)
    decided = measured.decided(key, ENV, ("cuda", "triton"))
    if decided is not None:
        return decided
    if torch._C._current_autograd_node() is not None or torch.cuda.get_sync_debug_mode() != 0:
        # inside a backward or in sync-debug mode: decided by a later eager forward
        return DEFAULT
    options = {name: _one_call(linear, name, x, weight, lora_A, lora_B, bias, scaling, dropout_p, training)
               for name in ("cuda", "triton")}
    devices = [x.device.index or 0] if x.is_cuda else []
    with torch.random.fork_rng(devices=devices):
        pick = measured.choose(key, options, DEFAULT, ENV)
        if not training:
            measured.choose(_graph_key(key), options, DEFAULT, ENV, by="gpu")
    _backends._once(("auto linear", key), f"lora_kernels: fused linear {tuple(x.shape)}x{tuple(weight.shape)} "
                        f"r={lora_A.shape[0]} {'train' if training else 'forward'}"
                        f"{' dropout' if dropout_p > 0 else ''} on {x.device} -> {pick} backend (measured faster: "
                        f"{measured.timings(key) or 'forced'} per call)")
    return pick


def settled(x, weight, lora_A, lora_B, bias, dropout_p: float) -> bool:
    """Whether this call's key has its backend for good (chosen by timing or forced by the variable), so the
    caller may reuse the name for calls with the same metadata."""
    from .triton import measured
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (x, lora_A, lora_B))
    return measured.decided(_key(x, weight, lora_A, lora_B, bias, dropout_p, training), ENV,
                            ("cuda", "triton")) is not None


def applies(backend: str, name: str, x, scaling_t) -> bool:
    """Whether the measured choice replaces the static one: `auto` picked the CUDA extension for CUDA tensors
    with a float scaling, and Triton is available too."""
    return (backend == "auto" and name == "cuda" and scaling_t is None and x.is_cuda
            and not torch.compiler.is_compiling() and _backends.triton_available())
