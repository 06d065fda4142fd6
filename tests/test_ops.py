"""The fused op against the float64 oracle (DESIGN.md rule), opcheck and torch.compile."""
import os

import pytest
import torch

import lora_kernels as lk
from lora_kernels import ops
from helpers import TRITON_DEVICE, check_eager_path_matches_ops, make_inputs, oracle_check

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
CPU_DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (M, K, N, r): odd sizes, K and N not multiples of 16, M = 1 and 3 and 17.
SHAPES = [(1, 33, 17, 1), (3, 40, 24, 4), (17, 70, 45, 8), (64, 100, 90, 16), (5, 129, 66, 33)]


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_torch_backend_oracle(dtype, shape, dropout_p):
    M, K, N, r = shape
    oracle_check(*make_inputs(M, K, N, r, dtype), dropout_p=dropout_p, backend="torch")


@pytest.mark.parametrize("variant", ["3d", "noncontig", "nobias", "fp32_adapters", "big_M", "rank256"])
def test_torch_backend_layouts(variant):
    dtype = torch.bfloat16 if variant == "fp32_adapters" else torch.float32
    M, K, N, r = (1000, 48, 40, 8) if variant == "big_M" else (9, 300, 260, 256) if variant == "rank256" \
        else (11, 50, 30, 6)
    inputs = make_inputs(M, K, N, r, dtype, x_3d=variant == "3d", noncontig=variant == "noncontig",
                         bias=variant != "nobias",
                         adapter_dtype=torch.float32 if variant == "fp32_adapters" else None)
    got = oracle_check(*inputs, dropout_p=0.1, backend="torch")
    if variant == "fp32_adapters":
        assert got[2].dtype == torch.float32 and got[3].dtype == torch.float32  # dA, dB in adapter dtype


@pytest.mark.skipif(not INTERP, reason="interpreter cases run where there is no GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 33, 17, 1), (17, 70, 45, 8), (40, 64, 96, 16), (5, 48, 20, 40),
                                   (100, 48, 40, 8)])      # M > 64: the separate x·Aᵀ kernel even without dropout
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_triton_interpreter_oracle(dtype, shape, dropout_p):
    M, K, N, r = shape
    oracle_check(*make_inputs(M, K, N, r, dtype), dropout_p=dropout_p, backend="triton")


@pytest.mark.skipif(not INTERP, reason="interpreter cases run where there is no GPU")
@pytest.mark.parametrize("variant", ["3d", "noncontig", "nobias", "fp32_adapters_fp16_x"])
def test_triton_interpreter_layouts(variant):
    dtype = torch.float16 if variant == "fp32_adapters_fp16_x" else torch.float32
    inputs = make_inputs(7, 40, 36, 4, dtype, x_3d=variant == "3d", noncontig=variant == "noncontig",
                         bias=variant != "nobias",
                         adapter_dtype=torch.float32 if variant.startswith("fp32_adapters") else None)
    oracle_check(*inputs, dropout_p=0.1, backend="triton")


def test_scaling_tensor_matches_float():
    x, w, a, b, bias = make_inputs(6, 20, 12, 3, torch.float32)
    y1 = lk.lora_linear(x, w, a, b, 0.5, bias)
    y2 = lk.lora_linear(x, w, a, b, torch.tensor(0.5), bias)
    torch.testing.assert_close(y1, y2)


def test_no_weight_gradient_is_computed():
    x, w, a, b, bias = make_inputs(4, 16, 8, 2, torch.float32)
    a.requires_grad_(True)
    y = lk.lora_linear(x, w, a, b, 1.0, bias)
    y.sum().backward()
    assert w.grad is None and a.grad is not None


def _op_args(M=5, K=24, N=20, r=4, p=0.0):
    x, w, a, b, bias = make_inputs(M, K, N, r, torch.float32)
    seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64) if p > 0 else None
    return x, w, a.requires_grad_(), b.requires_grad_(), bias, seed


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("with_scale_tensor", [False, True])
def test_opcheck_forward(p, with_scale_tensor):
    x, w, a, b, bias, seed = _op_args(p=p)
    x.requires_grad_(True)
    st = torch.tensor(0.5) if with_scale_tensor else None
    torch.library.opcheck(ops.lora_fwd, (x, w, a, b, bias, 0.5, st, p, seed, "torch", False))


def test_opcheck_backward_and_merge():
    x, w, a, b, bias, seed = _op_args(p=0.2)
    y, xa = ops.lora_fwd(x, w, a.detach(), b.detach(), bias, 0.5, None, 0.2, seed, "torch", False)
    dy = torch.randn_like(y)
    for need_dx, need_db in ((True, True), (False, False)):
        torch.library.opcheck(ops.lora_bwd, (dy, x, w, a.detach(), b.detach(), xa, 0.5, None, 0.2, seed,
                                             need_dx, need_db, "torch", False))
    torch.library.opcheck(ops.merge_op, (w.clone(), a.detach(), b.detach(), 0.5, False, "torch"))


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_equals_eager(compile_backend):
    torch._dynamo.reset()
    x, w, a, b, bias = make_inputs(8, 32, 24, 4, torch.float32)

    def step(x, a, b, s):
        return lk.lora_linear(x, w, a, b, s, bias, dropout_p=0.1).square().sum()

    leaves = [t.clone().requires_grad_() for t in (x, a, b)]
    leaves_c = [t.clone().requires_grad_() for t in (x, a, b)]
    s = torch.tensor(0.5)
    torch.manual_seed(3)
    eager = step(*leaves, s)
    eager.backward()
    compiled = torch.compile(step, fullgraph=True, backend=compile_backend)
    torch.manual_seed(3)
    out = compiled(*leaves_c, s)
    out.backward()
    torch.testing.assert_close(out, eager)
    for le, lc in zip(leaves, leaves_c):
        torch.testing.assert_close(lc.grad, le.grad)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_eager_fast_path_equals_registered_ops(monkeypatch, backend):
    # Eager calls skip the custom-op layer (host time); results and gradients must be bit-identical to the ops'.
    x, w, a, b, bias = make_inputs(13, 40, 24, 4, torch.float32, bias=True,
                                   device=TRITON_DEVICE if backend == "triton" else "cpu")

    check_eager_path_matches_ops(
        monkeypatch, ops,
        lambda xx, aa, bb, bi: lk.lora_linear(xx, w, aa, bb, 1.5, bi, dropout_p=0.25, backend=backend),
        (x, a, b, bias), "_EagerLoRABackward")


def test_repeated_calls_reuse_the_checked_resolution_and_still_refuse_bad_input(monkeypatch):
    """Eager calls with the metadata of an earlier checked call skip the checks and the backend choice; any
    change the checks read (shape, dtype, a weight that now needs grad, the options) is a new key, checked."""
    monkeypatch.setattr(ops, "_RESOLVED", {})
    x, w, a, b, bias = make_inputs(6, 8, 5, 2, torch.float32)
    first = lk.lora_linear(x, w, a, b, 0.5, bias)
    assert list(ops._RESOLVED.values()) == ["torch"]
    with monkeypatch.context() as m:
        m.setattr(ops, "check_lora_args", lambda *args: pytest.fail("checked again"))
        assert torch.equal(lk.lora_linear(x, w, a, b, 0.5, bias), first)
    w.requires_grad_(True)
    with pytest.raises(ValueError, match="requires_grad"):
        lk.lora_linear(x, w, a, b, 0.5, bias)
    w.requires_grad_(False)
    with pytest.raises(ValueError, match="lora_B"):
        lk.lora_linear(x, w, a, b[:, :1], 0.5, bias)
    with pytest.raises(ValueError, match="dropout_p"):
        lk.lora_linear(x, w, a, b, 0.5, bias, dropout_p=1.0)
    with pytest.raises(ValueError, match="finite"):
        lk.lora_linear(x, w, a, b, float("inf"), bias)
    with pytest.raises(ValueError, match="backend"):
        lk.lora_linear(x, w, a, b, 0.5, bias, backend="nope")
    assert len(ops._RESOLVED) == 1, "a refused call was remembered"
    monkeypatch.setattr(ops, "_RESOLVED_MAX", 2)
    for rows in (3, 4, 5):
        lk.lora_linear(x[:rows], w, a, b, 0.5, bias)
    assert len(ops._RESOLVED) <= 2
