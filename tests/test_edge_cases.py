"""Numerical edge cases and determinism: empty batches, NaN/Inf, fp16 overflow, bit-identical reruns."""
import os

import pytest
import torch

import lora_kernels as lk
from lora_kernels import reference
from helpers import make_inputs

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
# (backend, device): the reference and, where they can run, the Triton kernels (interpreter on the CPU, or the GPU)
BACKENDS = [("torch", "cpu")] + ([("triton", "cpu")] if INTERP else []) + \
    ([("triton", "cuda")] if torch.cuda.is_available() else []) + \
    ([("cuda", "cuda")] if torch.cuda.is_available() and lk.cuda_ext_available() else [])
IDS = [f"{b}-{d}" for b, d in BACKENDS]


@pytest.mark.parametrize("backend,dev", BACKENDS, ids=IDS)
@pytest.mark.parametrize("x_shape", [(0, 24), (2, 0, 24)])
def test_empty_batch(backend, dev, x_shape):
    _, w, a, b, bias = make_inputs(1, 24, 10, 3, torch.float32, device=dev)
    x = torch.randn(x_shape, device=dev, requires_grad=True)
    a.requires_grad_()
    y = lk.lora_linear(x, w, a, b, 0.5, bias, dropout_p=0.1, backend=backend)
    assert y.shape == (*x_shape[:-1], 10)
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.count_nonzero(a.grad) == 0


def _patterns(y):
    return torch.isnan(y), torch.isposinf(y), torch.isneginf(y)


@pytest.mark.parametrize("backend,dev", BACKENDS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nan_inf_propagate_like_the_unfused_path(backend, dev, dtype):
    x, w, a, b, bias = make_inputs(6, 32, 20, 4, dtype, adapter_dtype=torch.float32, device=dev)
    x[1, 3] = float("nan")
    x[2, 5] = float("inf")
    a[1, 7] = float("-inf")
    b[4, 2] = float("nan")
    fused = lk.lora_linear(x, w, a, b, 0.5, bias, backend=backend)
    unfused = reference.lora_linear(x, w, a, b, 0.5, bias)
    for got, expect in zip(_patterns(fused), _patterns(unfused)):
        assert torch.equal(got, expect)


@pytest.mark.parametrize("backend,dev", BACKENDS, ids=IDS)
def test_fp16_overflow_like_the_unfused_path(backend, dev):
    K, N = 64, 4
    x = torch.ones(3, K, dtype=torch.float16, device=dev)
    w = torch.zeros(N, K, dtype=torch.float16, device=dev)
    w[0] = 2000.0                      # exact output 128000: beyond float16's 65504
    w[1] = 500.0                       # 32000: representable
    w[2] = -2000.0
    a = torch.full((2, K), 0.01, device=dev)
    b = torch.full((N, 2), 0.5, device=dev)
    fused = lk.lora_linear(x, w, a, b, 1.0, backend=backend)
    unfused = reference.lora_linear(x, w, a, b, 1.0)
    for y in (fused, unfused):
        assert torch.isposinf(y[:, 0]).all() and torch.isneginf(y[:, 2]).all()
        assert torch.isfinite(y[:, 1]).all() and torch.isfinite(y[:, 3]).all()


@pytest.mark.parametrize("backend,dev", BACKENDS, ids=IDS)
def test_deterministic_reruns_bit_identical(backend, dev):
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            x, w, a, b, bias = (t.clone() for t in make_inputs(40, 48, 36, 8, torch.float32, device=dev,
                                                               gen=torch.Generator(device=dev).manual_seed(7)))
            x.requires_grad_()
            a.requires_grad_()
            b.requires_grad_()
            torch.manual_seed(11)
            y = lk.lora_linear(x, w, a, b, 0.5, bias, dropout_p=0.2, backend=backend)
            y.square().sum().backward()
            runs.append([y.detach(), x.grad, a.grad, b.grad])
        for u, v in zip(*runs):
            assert torch.equal(u.view(torch.int32), v.view(torch.int32))
    finally:
        torch.use_deterministic_algorithms(prev)


def test_dropout_masks_reproduce_from_manual_seed_and_differ_otherwise():
    x, w, a, b, _ = make_inputs(32, 64, 16, 4, torch.float32)
    torch.manual_seed(5)
    y1 = lk.lora_linear(x, w, a, b, 1.0, dropout_p=0.5)
    torch.manual_seed(5)
    y2 = lk.lora_linear(x, w, a, b, 1.0, dropout_p=0.5)
    y3 = lk.lora_linear(x, w, a, b, 1.0, dropout_p=0.5)
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)
