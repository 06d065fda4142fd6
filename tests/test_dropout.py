"""The dropout mask: the right rate, reproducible from a seed, identical across backends."""
import os

import pytest
import torch
import triton
import triton.language as tl

from lora_kernels import reference
from lora_kernels.triton.dropout import keep_mask, load_seed

INTERP = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_rate_and_determinism(p):
    seed = torch.tensor(987654321)
    keep = reference.dropout_keep(seed, 300, 257, p)
    rate = 1 - keep.float().mean().item()
    assert abs(rate - p) < 0.01
    assert torch.equal(keep, reference.dropout_keep(seed, 300, 257, p))
    assert not torch.equal(keep, reference.dropout_keep(seed + 1, 300, 257, p))
    # rows and columns are not copies of each other
    assert not torch.equal(keep[0], keep[1]) and not torch.equal(keep[:, 0], keep[:, 1])


def test_scale_keeps_expectation():
    x = torch.ones(2000, 100, dtype=torch.float64)
    y = reference.apply_dropout(x, 0.25, torch.tensor(5))
    assert abs(y.mean().item() - 1.0) < 0.01


@triton.jit
def _mask_kernel(out_ptr, seed_ptr, threshold, R: tl.constexpr, C: tl.constexpr):
    rows = tl.arange(0, R)
    cols = tl.arange(0, C)
    keep = keep_mask(load_seed(seed_ptr), rows, cols, threshold)
    tl.store(out_ptr + rows[:, None] * C + cols[None, :], keep.to(tl.int8))


@pytest.mark.skipif(not (INTERP or torch.cuda.is_available()), reason="needs a GPU or the interpreter")
def test_triton_mask_equals_reference():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    seed = torch.tensor(2**31 - 5, dtype=torch.int64, device=dev)
    out = torch.empty(32, 64, dtype=torch.int8, device=dev)
    _mask_kernel[(1,)](out, seed, reference.dropout_threshold(0.4), R=32, C=64)
    assert torch.equal(out.bool(), reference.dropout_keep(seed, 32, 64, 0.4))
