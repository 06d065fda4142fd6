"""`backend="auto"` for the fused linear on a GPU: the fastest path per shape and mode, measured.

Neither backend wins everywhere (the CUDA extension's cuBLAS composition costs less host time per call; the
Triton kernels keep the dropout mask in registers and read x once), and where a call is bound by host time
the unfused composite (y = x·Wᵀ, then y += s·(x·Aᵀ)·Bᵀ in one addmm: the bench's `addmm` provider) can beat
a fused path whose launches cost more host time than its kernels save. So the first eager call of each shape
and mode (forward only, or forward + backward when a gradient is needed) times calls of each candidate on
the same tensors, each after the L2 cache is overwritten (measured.cold_ms, as the bench times them), and the
fastest serves that key from then on (`LORA_KERNELS_AUTO=cuda|triton|addmm` forces one). Candidates: the
built backends, and where the CUDA extension is not built the composite, which keeps what the fused op keeps
(x and x·Aᵀ; with dropout the mask is regenerated in backward by one Triton kernel, never stored), so auto
trades no memory for speed. The timing leaves no trace: it runs on detached views, takes gradients with
autograd.grad (nothing is accumulated) and restores the random generators, so dropout masks drawn later are
those of an untimed run.
Nothing is timed inside CUDA-graph capture, sync-debug mode or a backward pass (an activation-checkpoint
recompute): those take the statically resolved backend until the key is decided. Forward-only keys also get
a second pick, by GPU time alone, which CUDA-graph captures take: a replay has no host time, and at 16 rows
the Triton split-K path ran in 12 µs of GPU time against the extension's 18 µs while losing the eager
(host-bound) timing. torch.compile keeps the statically resolved ops.
"""
from __future__ import annotations

import os

import torch

from . import _backends

ENV = "LORA_KERNELS_AUTO"
DEFAULT = "cuda"
ADDMM = "addmm"


def candidates() -> tuple:
    """The paths auto times: the built GPU backends; without the CUDA extension, the unfused composite too.
    The extension runs the same cuBLAS products as the composite (its dropout kernels make fewer passes, 989
    against 1040 µs of GPU time per 8192×4096² train step) from one C++ call, so next to it the composite can
    only win by timing noise, and did: a 2048-row train key picked it on one timing and then ran 0.43 ms per
    call against the extension's 0.25 (bench/NOTES.md, "Session of 2026-11-29, close of day")."""
    if _backends.cuda_ext_available():
        return ("cuda", "triton")
    return ("triton", ADDMM)


def forcible() -> tuple:
    """The names LORA_KERNELS_AUTO may force: the candidates, and the composite even where it is not timed."""
    names = candidates()
    return names if ADDMM in names else names + (ADDMM,)


def addmm_linear(x, weight, lora_A, lora_B, bias, scaling: float, dropout_p: float = 0.0):
    """The unfused composite: y = x·Wᵀ (+ bias), then y += s·(dropout(x)·Aᵀ)·Bᵀ in one addmm, the adapters
    cast to x's dtype (their gradients come back in their own). What is kept for backward is x and x·Aᵀ, as
    the fused op keeps: without dropout plain autograd keeps just that; with it, _MaskedComposite draws the
    seed as the fused paths do and regenerates the mask in backward (one Triton kernel each time)."""
    if dropout_p > 0.0:
        from .ops import dropout_seed
        x2d = x.reshape(-1, x.shape[-1])
        x2d = x2d if x2d.stride(-1) == 1 else x2d.contiguous()
        y = _MaskedComposite.apply(x2d, weight, lora_A, lora_B, bias, scaling, dropout_p,
                                   dropout_seed(x2d, lora_A))
        return y.reshape(*x.shape[:-1], weight.shape[0])
    dt = x.dtype
    x2d = x.reshape(-1, x.shape[-1])
    differentiable = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                     for t in (x, lora_A, lora_B, bias))
    if not differentiable and merged_weight_pays(x2d.shape[0], weight.shape[0], weight.numel(), x2d.numel(), 2):
        # y = x·(W + s·B·A)ᵀ: one GEMM on a merged copy of W, as auto's merged_linear (W merged by cuBLAS here)
        w = torch.addmm(weight, lora_B.to(dt), lora_A.to(dt), alpha=scaling)
        y = torch.addmm(bias.to(dt), x2d, w.t()) if bias is not None else x2d @ w.t()
        return y.reshape(*x.shape[:-1], weight.shape[0])
    xa = x2d @ lora_A.to(dt).t()
    y = _lowrank_then_base(x2d, weight, xa, lora_B.to(dt), bias, scaling)
    return y.reshape(*x.shape[:-1], weight.shape[0])


MERGED = "merged weight"
MERGED_ENV = "LORA_KERNELS_MERGED_WEIGHT"
# Below ~200 µs of GEMM the merged form's extra host time (a Python-side Triton launch) outweighs the bytes it
# saves: in a TinyLlama-shaped eval pass (4096 tokens, every layer ≤ 4.7e10) it made the model forward 60.3 ms
# against 51.2 without it (bench/results/infer-forward-h200-20261130-c3cfe29.txt).
MERGED_MIN_MNK = 1 << 36


def merged_serves(x, weight, lora_A, lora_B, bias, dropout_p: float) -> bool:
    """Whether `auto` runs this call as y = x·(W + s·B·A)ᵀ (+ bias) (merged_linear): nothing to differentiate,
    no dropout, 16-bit x and W on a GPU with Triton, and fewer bytes moved than the low-rank passes
    (merged_weight_pays: forward only, so x's pass for x·Aᵀ counts too)."""
    if dropout_p > 0.0 or not x.is_cuda or x.dtype not in (torch.float16, torch.bfloat16) or os.environ.get(ENV):
        return False  # (a backend forced through LORA_KERNELS_AUTO is run as forced)
    if weight.dtype != x.dtype or weight.stride(-1) != 1 or not _backends.triton_available():
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, lora_A, lora_B, bias)):
        return False
    K, N = x.shape[-1], weight.shape[0]
    M = x.numel() // max(K, 1)
    if M * N * K < MERGED_MIN_MNK and not os.environ.get(MERGED_ENV):
        return False
    return merged_weight_pays(M, N, N * K, M * K)


def merged_linear(x, weight, lora_A, lora_B, bias, scaling: float):
    """y = x·(W + s·B·A)ᵀ (+ bias): the merge kernel writes W + s·B·A to a new tensor (one read and one write
    of W, rounded once as merge_ rounds it), then one cuBLAS GEMM. The low-rank passes it replaces read x for
    x·Aᵀ and write an M×N product: at 8192×4096² that is 128 MB against the merge's 64."""
    from .triton import merge
    x2d = x.reshape(-1, x.shape[-1])
    w = merge.merged_copy(weight, lora_A, lora_B, scaling)
    y = torch.addmm(bias.to(x.dtype), x2d, w.t()) if bias is not None else x2d @ w.t()
    return y.reshape(*x.shape[:-1], weight.shape[0])


def merged_weight_pays(rows: int, out_cols: int, w_elems: int, extra: int, w_passes: int = 1) -> bool:
    """Whether the low-rank term costs fewer bytes through a merged copy of W (each pass reads and writes W:
    2·w_elems) than through the composite's passes (the low-rank product written, rows·out_cols, which the
    big GEMM's epilogue reads back mostly hidden under its math, plus `extra`); LORA_KERNELS_MERGED_WEIGHT=1 /
    0 forces it. torch.addmm(W, B, A) makes two passes (W copied into its output first: 16 + 19 µs at 4096²)."""
    force = os.environ.get(MERGED_ENV, "")[:1]
    if force in ("0", "1"):
        return force == "1"
    return 2 * w_passes * w_elems < rows * out_cols + extra


def _lowrank_then_base(x2d, weight, xa, b, bias, scaling):
    """y = s·xa·bᵀ (+ bias) first, then y += x·Wᵀ in the big GEMM (beta = 1: y read in its epilogue), as the
    extension orders them: one pass over y fewer than adding the low-rank term after the GEMM."""
    if bias is not None:
        y = torch.addmm(bias.to(x2d.dtype), xa, b.t(), alpha=scaling)
    else:
        y = _scaled_mm(xa, b.t(), scaling)
    return y.addmm_(x2d, weight.t())


def _scaled_mm(m1, m2, s):
    """s·m1·m2 by one GEMM, s in its alpha (one launch and one rounding, not a product and then a scaling);
    beta = 0, so the uninitialised input is ignored."""
    return torch.addmm(m1.new_empty((m1.shape[0], m2.shape[1])), m1, m2, beta=0, alpha=s)


class _MaskedComposite(torch.autograd.Function):
    """addmm_linear with dropout: cuBLAS products around small Triton kernels that apply the mask (the fused
    kernels' mask, from the seed): dropout(x) in forward, one pass over x for dA and dx's masked low-rank
    term in backward; x and x·Aᵀ are all it keeps."""

    @staticmethod
    def forward(ctx, x2d, weight, lora_A, lora_B, bias, scaling, p, seed):
        from .triton import dropout
        dt = x2d.dtype
        a, b = lora_A.to(dt), lora_B.to(dt)  # kept for backward too: r×K and N×r, one cast each per step
        xa = dropout.apply(x2d, p, seed) @ a.t()
        y = _lowrank_then_base(x2d, weight, xa, b, bias, scaling)
        ctx.save_for_backward(x2d, weight, a, b, xa, seed)
        ctx.adapter_dtypes = lora_A.dtype, lora_B.dtype
        ctx.scaling, ctx.p, ctx.bias_dtype = scaling, p, bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, dy):
        from .triton import dropout
        x2d, weight, a, b, xa, seed = ctx.saved_tensors
        s, p = ctx.scaling, ctx.p
        dy = dy.contiguous()
        g = _scaled_mm(dy, b, s)                                              # s·dy·B (M×r)
        dx = dB = dbias = None
        if ctx.needs_input_grad[0]:
            dx = dy @ weight
        dA = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[2]:
            # one pass over x: dA = gᵀ·dropout(x), and dx += mask ⊙ (s·dy·B·A) / (1-p)
            dA = dropout.lowrank_backward(x2d, g, a, dx, p, seed).to(ctx.adapter_dtypes[0])
        if ctx.needs_input_grad[3]:
            dB = _scaled_mm(dy.t(), xa, s).to(ctx.adapter_dtypes[1])
        if ctx.needs_input_grad[4]:
            dbias = dy.sum(0).to(ctx.bias_dtype)
        return dx, None, dA if ctx.needs_input_grad[2] else None, dB, dbias, None, None, None


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
        if backend == ADDMM:
            y = addmm_linear(views[0], weight, views[1], views[2], bias, scaling, dropout_p)
        else:
            y = linear(views[0], weight, views[1], views[2], scaling, bias, dropout_p=dropout_p, backend=backend)
        if wanted:
            torch.autograd.grad(y, wanted, torch.ones_like(y))
    return run


def linear_backend(linear, x, weight, lora_A, lora_B, bias, scaling: float, dropout_p: float,
                   default: str = DEFAULT) -> str:
    """'cuda', 'triton' or 'addmm' for this call (x (..., K) on a GPU, eager mode); `default` (the backend
    resolved statically) serves while the key cannot be timed."""
    from .triton import measured
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (x, lora_A, lora_B))
    key = _key(x, weight, lora_A, lora_B, bias, dropout_p, training)
    names, forced = candidates(), forcible()
    capturing = torch.cuda.is_current_stream_capturing()
    if capturing:
        # A CUDA graph replays kernels without their host time, so it takes the pick by GPU time, made
        # beside the eager pick on the first eager call (graphs are captured after an eager warm-up).
        return (measured.decided(_graph_key(key), ENV, forced)
                or measured.decided(key, ENV, forced) or default)
    decided = measured.decided(key, ENV, forced)
    if decided is not None:
        return decided
    if torch._C._current_autograd_node() is not None or torch.cuda.get_sync_debug_mode() != 0:
        # inside a backward or in sync-debug mode: decided by a later eager forward
        return default
    options = {name: _one_call(linear, name, x, weight, lora_A, lora_B, bias, scaling, dropout_p, training)
               for name in names}
    devices = [x.device.index or 0] if x.is_cuda else []
    with torch.random.fork_rng(devices=devices):
        pick = measured.choose(key, options, default, ENV)
        if not training:
            measured.choose(_graph_key(key), options, default, ENV, by="gpu")
    _backends._once(("auto linear", key), f"lora_kernels: fused linear {tuple(x.shape)}x{tuple(weight.shape)} "
                        f"r={lora_A.shape[0]} {'train' if training else 'forward'}"
                        f"{' dropout' if dropout_p > 0 else ''} on {x.device} -> "
                        f"{'the unfused addmm composite' if pick == ADDMM else pick + ' backend'} (measured faster: "
                        f"{measured.timings(key) or 'forced'} per call)")
    return pick


def settled(x, weight, lora_A, lora_B, bias, dropout_p: float) -> bool:
    """Whether this call's key has its backend for good (chosen by timing or forced by the variable), so the
    caller may reuse the name for calls with the same metadata."""
    from .triton import measured
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (x, lora_A, lora_B))
    return measured.decided(_key(x, weight, lora_A, lora_B, bias, dropout_p, training), ENV,
                            forcible()) is not None


def applies(backend: str, name: str, x, scaling_t) -> bool:
    """Whether the measured choice replaces the static one: `auto` resolved to a GPU backend for CUDA tensors
    with a float scaling, and Triton (whose package holds the timers) is available."""
    return (backend == "auto" and name in ("cuda", "triton") and scaling_t is None and x.is_cuda
            and not torch.compiler.is_compiling() and _backends.triton_available())
