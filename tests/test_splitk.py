"""The split-K forward for few rows (lora_kernels/triton/splitk.py): the oracle rule on its own, NF4 included,
and the rule that picks it (forced, measured once per shape, never inside capture or sync-debug mode)."""
import pytest
import torch

import lora_kernels as lk
from lora_kernels.nf4 import dequantize_nf4, quantize_nf4
from lora_kernels.triton import splitk
from helpers import TRITON_DEVICES, count_calls, make_inputs, oracle_check

pytestmark = pytest.mark.skipif(not lk.triton_available(), reason="needs triton")
DEVICES = TRITON_DEVICES


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("M, K, N, r, dtype, adapter_fp32, bias", [
    (1, 128, 40, 4, torch.float16, False, True),
    (3, 100, 70, 1, torch.float32, True, False),       # K not a multiple of the K tile
    (16, 64, 33, 16, torch.float16, True, True),
    (17, 300, 129, 33, torch.float32, False, True),    # rank padded 33 -> 64
    (64, 96, 17, 128, torch.float16, False, False),
])
@pytest.mark.parametrize("path", ["splitk", "fused"])
def test_splitk_forward_meets_the_oracle_rule(monkeypatch, device, M, K, N, r, dtype, adapter_fp32, bias, path):
    """Both forms: partials then a reduce launch, and the fused one (the last program of each column block
    to finish does its reduce)."""
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the interpreter runs float32 / float16")
    monkeypatch.setenv("LORA_KERNELS_DECODE", path)
    fused_flags = []
    orig = splitk.forward
    monkeypatch.setattr(splitk, "forward",
                        lambda *a, **k: (fused_flags.append(k.get("fused", False)), orig(*a, **k))[1])
    inputs = make_inputs(M, K, N, r, dtype, device=device, bias=bias,
                         adapter_dtype=torch.float32 if adapter_fp32 else None)
    oracle_check(*inputs, dropout_p=0.0, backend="triton", seed=M + K)
    assert fused_flags and all(f == (path == "fused") for f in fused_flags), fused_flags


@pytest.mark.parametrize("device", DEVICES)
def test_splitk_with_tensor_scaling_and_strided_rows(monkeypatch, device):
    monkeypatch.setenv("LORA_KERNELS_DECODE", "splitk")
    calls = count_calls(monkeypatch, splitk, "forward")
    torch.manual_seed(0)
    x = torch.randn(5, 2, 96, device=device)[:, 0]     # rows 192 elements apart
    w, a, b = torch.randn(40, 96, device=device), torch.randn(8, 96, device=device), torch.randn(40, 8, device=device)
    s = torch.tensor(0.3, device=device)
    y = lk.lora_linear(x, w, a, b, s, backend="triton")
    ref = x.double() @ w.double().t() + 0.3 * (x.double() @ a.double().t()) @ b.double().t()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4)
    assert calls


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("M, N", [(3, 48), (1, 50), (4, 37)])
def test_splitk_nf4_matches_gemm_path_and_reference(monkeypatch, device, M, N):
    """Both split-K partials (tensor-core products; multiply-adds for at most 4 rows) meet the oracle rule
    against the one-GEMM path, N not a multiple of the column block included."""
    torch.manual_seed(M * 100 + N)
    q = quantize_nf4(torch.randn(N, 192, device=device, dtype=torch.float16))
    x = torch.randn(M, 192, device=device, dtype=torch.float16)
    a, b = torch.randn(8, 192, device=device) / 14, torch.randn(N, 8, device=device)
    bias = torch.randn(N, device=device, dtype=torch.float16)
    w = dequantize_nf4(q, torch.float64)
    ref = x.double() @ w.t() + 0.5 * (x.double() @ a.double().t()) @ b.double().t() + bias.double()
    out = {}
    for path in ("gemm", "splitk", "gemv"):
        monkeypatch.setenv("LORA_KERNELS_DECODE", path)
        out[path] = lk.lora4_linear(x, q, a, b, 0.5, bias, backend="triton").double()
    err = {p: (y - ref).norm().item() for p, y in out.items()}
    for path in ("splitk", "gemv"):
        assert err[path] <= 2 * err["gemm"] + 1e-6 * ref.norm().item(), err


def test_path_rule_forced_measured_and_safe(monkeypatch):
    from lora_kernels.triton import measured
    monkeypatch.setattr(measured, "_chosen", {})
    monkeypatch.setenv("LORA_KERNELS_DECODE", "splitk")
    assert splitk.choose_path(("k",), None, None) == "splitk"
    monkeypatch.delenv("LORA_KERNELS_DECODE")
    if measured.configs.interpreting():
        assert splitk.choose_path(("k",), None, None) == "gemm" and measured._chosen == {}
    monkeypatch.setattr(measured.configs, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)
    assert splitk.choose_path(("k",), None, None) == "gemm" and measured._chosen == {}  # nothing timed in capture
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    # decode variants are timed on the GPU alone (host time hidden): measured.gpu_ms
    monkeypatch.setattr(measured, "gpu_ms", lambda fn: fn())
    monkeypatch.setattr(measured, "cold_ms", lambda fn: -fn())                      # would pick the slower one
    assert splitk.choose_path(("k",), lambda: 2.0, lambda: 1.0) == "splitk"          # the faster one, kept
    assert splitk.choose_path(("k",), lambda: 1.0, lambda: 2.0) == "splitk"
    assert measured._chosen == {("decode", "k"): "splitk"}
    assert splitk.choose_path(("k2",), lambda: 1.0, lambda: 2.0) == "gemm"
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 2)
    assert splitk.choose_path(("k3",), lambda: 2.0, lambda: 1.0) == "gemm" and ("decode", "k3") not in measured._chosen
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)

    def broken():
        raise RuntimeError("out of resources")
    with pytest.warns(UserWarning, match="'splitk' path failed"):   # a path that cannot run is left out
        assert splitk.choose_path(("k4",), lambda: 2.0, broken) == "gemm"
    with pytest.raises(RuntimeError, match="out of resources"):
        splitk.choose_path(("k5",), broken, broken)


def test_dropout_and_many_rows_keep_the_gemm_path(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_DECODE", "splitk")
    x, w, a, b, _ = make_inputs(65, 64, 32, 4, torch.float32)
    assert not splitk.applies(x, w, a, dropout_on=False)
    assert not splitk.applies(x[:8], w, a, dropout_on=True)
    assert splitk.applies(x[:8], w, a, dropout_on=False)
    assert not splitk.applies(x[:8, :0], w[:, :0], a[:, :0], dropout_on=False)   # K = 0
    assert not splitk.applies(x[:8], w[:0], a, dropout_on=False)                 # N = 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_splitk_bf16_on_gpu_deterministic(monkeypatch, dtype):
    monkeypatch.setenv("LORA_KERNELS_DECODE", "splitk")
    for M in (1, 16, 64):
        inputs = make_inputs(M, 4096, 1000, 16, dtype, device="cuda")
        oracle_check(*inputs, dropout_p=0.0, backend="triton", seed=M)
        x, w, a, b, bias = inputs
        y1 = lk.lora_linear(x, w, a, b, 0.5, bias, backend="triton")
        y2 = lk.lora_linear(x, w, a, b, 0.5, bias, backend="triton")
        assert torch.equal(y1, y2)


@pytest.mark.gpu
def test_splitk_nf4_first_call_gives_the_bits_of_later_ones(monkeypatch):
    """The split is chosen from the compiled kernel's residency, read by a one-program launch before the
    first grid: the very first call must already split K as every later call does."""
    from lora_kernels.triton import waves
    monkeypatch.setenv("LORA_KERNELS_DECODE", "splitk")
    monkeypatch.setattr(waves, "_resident", {})
    q = quantize_nf4(torch.randn(1000, 4096, device="cuda", dtype=torch.bfloat16))
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    a, b = torch.randn(16, 4096, device="cuda") / 64, torch.randn(1000, 16, device="cuda")
    first = lk.lora4_linear(x, q, a, b, 0.5, backend="triton")
    assert any(k[0] == "splitk" for k in waves._resident)
    assert torch.equal(first, lk.lora4_linear(x, q, a, b, 0.5, backend="triton"))


@pytest.mark.gpu
@pytest.mark.parametrize("M, K", [(1, 4096), (2, 320), (4, 4160)])
def test_nf4_gemv_partials_on_gpu(monkeypatch, M, K):
    """The multiply-add partials on the GPU: K not a multiple of their 256 / 128 / 64-column tile (masked
    tail), first call bit-equal to later ones, oracle rule against the tensor-core split-K path."""
    from lora_kernels.triton import waves
    monkeypatch.setattr(waves, "_resident", {})
    torch.manual_seed(K + M)
    q = quantize_nf4(torch.randn(1000, K, device="cuda", dtype=torch.bfloat16))
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    a, b = torch.randn(16, K, device="cuda") / K**0.5, torch.randn(1000, 16, device="cuda")
    ref = x.double() @ dequantize_nf4(q, torch.float64).t() + 0.5 * (x.double() @ a.double().t()) @ b.double().t()
    out = {}
    for path in ("splitk", "gemv"):
        monkeypatch.setenv("LORA_KERNELS_DECODE", path)
        out[path] = lk.lora4_linear(x, q, a, b, 0.5, backend="triton")
        assert torch.equal(out[path], lk.lora4_linear(x, q, a, b, 0.5, backend="triton"))
    err = {p: (y.double() - ref).norm().item() for p, y in out.items()}
    assert err["gemv"] <= 2 * err["splitk"] + 1e-6 * ref.norm().item(), err
