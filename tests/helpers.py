"""The oracle rule of DESIGN.md: a fused result's error against float64 is at most twice the error of
the unfused torch composite in the same dtype, plus 1e-6. Errors are Frobenius norms, and the 1e-6 term is
taken per element or relative to the exact result's norm, whichever is larger: 1e-6·max(√numel, ‖exact‖).
(The relative part matters only in float32, where a gradient that hinges on a few scalars, e.g. dA with
M = r = 1, is otherwise decided by the coin flip of one rounding; in bf16/fp16 it is far below 2× the
composite's error.)"""
import os

import torch

import lora_kernels as lk
from lora_kernels import reference

SEED_HIGH = 2**31 - 1
# Where the Triton kernels can run in this process: CPU tensors only under the interpreter (chosen before
# triton is imported, so not on a GPU machine), CUDA tensors where a GPU is present.
TRITON_DEVICES = (["cpu"] if os.environ.get("TRITON_INTERPRET") == "1" else []) + \
    (["cuda"] if torch.cuda.is_available() else [])
TRITON_DEVICE = TRITON_DEVICES[-1] if TRITON_DEVICES else "cpu"


def make_inputs(M, K, N, r, dtype, *, device="cpu", adapter_dtype=None, bias=True, x_3d=False,
                noncontig=False, gen=None):
    """Fresh random inputs; B is NOT zero (its default init is)."""
    adapter_dtype = adapter_dtype or dtype
    g = gen
    kw = dict(device=device, generator=g)
    if x_3d:
        x = torch.randn(M, 3, K, **kw).to(dtype)
    elif noncontig:
        x = torch.randn(K, M, **kw).to(dtype).t()          # (M, K), stride (1, M)
    else:
        x = torch.randn(M, K, **kw).to(dtype)
    w = (torch.randn(N, K, **kw) / K**0.5).to(dtype)
    a = (torch.randn(r, K, **kw) / K**0.5).to(adapter_dtype)
    b = (torch.randn(N, r, **kw) / r**0.5).to(adapter_dtype)
    bb = torch.randn(N, **kw).to(dtype) if bias else None
    return x, w, a, b, bb


def _run(fn, x, w, a, b, bias, dy, upcast=None):
    leaves = [t for t in (x, a, b, bias) if t is not None]
    if upcast is not None:
        leaves = [t.detach().to(upcast) for t in leaves]
        w = w.to(upcast)
    else:
        leaves = [t.detach().clone() for t in leaves]
    for t in leaves:
        t.requires_grad_(True)
    xx, aa, bb = leaves[:3]
    bias_ = leaves[3] if bias is not None else None
    y = fn(xx, w, aa, bb, bias_)
    y.backward(dy.to(y.dtype))
    return [y.detach()] + [t.grad for t in leaves]


def oracle_check(x, w, a, b, bias, *, scaling=0.75, dropout_p=0.0, backend="torch", seed=1234):
    """Runs fused / composite / float64 with the same dropout seed and asserts the rule."""
    torch.manual_seed(seed)
    seed_t = torch.randint(0, SEED_HIGH, (), device=x.device, dtype=torch.int64) if dropout_p > 0 else None

    def fused(xx, ww, aa, bb, bias_):
        torch.manual_seed(seed)
        return lk.lora_linear(xx, ww, aa, bb, scaling, bias_, dropout_p=dropout_p, backend=backend)

    def composite(xx, ww, aa, bb, bias_):
        return reference.lora_linear(xx, ww, aa, bb, scaling, bias_, dropout_p=dropout_p, seed=seed_t)

    y_shape = (*x.shape[:-1], w.shape[0])
    dy = torch.randn(y_shape, device=x.device, dtype=torch.float64)
    got = _run(fused, x, w, a, b, bias, dy)
    base = _run(composite, x, w, a, b, bias, dy)
    exact = _run(composite, x, w, a, b, bias, dy, upcast=torch.float64)
    names = ["y", "dx", "dA", "dB", "dbias"]
    for name, g_, c_, e_ in zip(names, got, base, exact):
        assert not torch.isnan(g_).any(), f"{name}: NaN in fused result"
        assert g_.shape == e_.shape, f"{name}: shape {tuple(g_.shape)} != {tuple(e_.shape)}"
        assert g_.dtype == c_.dtype, f"{name}: dtype {g_.dtype} != composite's {c_.dtype}"
        err = (g_.double() - e_).norm().item()
        tol = 2 * (c_.double() - e_).norm().item() + 1e-6 * max(e_.numel() ** 0.5, e_.norm().item())
        assert err <= tol, f"{name}: fused error {err:.3e} > 2x composite error + 1e-6 term = {tol:.3e}"
    return got


def check_eager_path_matches_ops(monkeypatch, module, call, leaves, node_name):
    """call(*leaf_copies) -> y, run once through the eager fast path and once with module._eager forced off
    (the registered custom ops): the autograd node must be node_name vs another, y and every leaf's gradient
    bit-identical. The dropout seed is reset before each run so both paths draw the same mask."""
    def run():
        torch.manual_seed(7)
        copies = [t.detach().clone().requires_grad_() for t in leaves]
        y = call(*copies)
        y.backward(torch.ones_like(y))
        fn = y.grad_fn
        while type(fn).__name__.startswith("View"):  # the public functions reshape the 2-D result
            fn = fn.next_functions[0][0]
        return y, [t.grad for t in copies], type(fn).__name__

    y_fast, g_fast, fn_fast = run()
    monkeypatch.setattr(module, "_eager", lambda *t: False)
    y_op, g_op, fn_op = run()
    assert fn_fast == node_name and fn_op != fn_fast
    assert torch.equal(y_fast, y_op)
    for gf, go in zip(g_fast, g_op):
        assert torch.equal(gf, go)


def count_calls(monkeypatch, module, name):
    """A list that grows by one entry each time module.name is called (the call itself still runs): proof that
    a forced path really ran."""
    calls = []
    orig = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: (calls.append(1), orig(*a, **k))[1])
    return calls
