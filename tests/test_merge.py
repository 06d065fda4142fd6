"""merge_ / unmerge_: one rounding, bit-exact re-merge, bounded drift, no byte changed on bad input."""
import os

import pytest
import torch

import lora_kernels as lk
from lora_kernels import reference
from helpers import TRITON_DEVICES

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = ["torch"] + (["triton"] if INTERP else [])


def _adapters(N, K, r, wdtype, adtype=torch.float32):
    w = torch.randn(N, K).to(wdtype)
    a = (torch.randn(r, K) / K**0.5).to(adtype)
    b = torch.randn(N, r).to(adtype)
    return w, a, b


def _dtypes(backend):
    # The Triton interpreter mishandles bfloat16; bf16 merges are checked on the GPU.
    return [torch.float32, torch.float16] + ([torch.bfloat16] if backend == "torch" else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_rounds_once(backend):
    for dt in _dtypes(backend):
        w, a, b = _adapters(37, 53, 5, dt)
        expect = (w.double() + (b.double() @ a.double()) * 0.7)
        merged = lk.merge_(w.clone(), a, b, 0.7, backend=backend)
        # one rounding of a float32-accumulated sum: within half an ulp of dt plus fp32 noise
        ulp = torch.finfo(dt).eps * expect.abs().clamp_min(torch.finfo(dt).tiny)
        assert ((merged.double() - expect).abs() <= ulp + 1e-5 * expect.abs() + 1e-6).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_unmerge_remerge_bit_equal_and_drift_bounded(backend):
    for dt in _dtypes(backend):
        w, a, b = _adapters(29, 41, 7, dt)
        w0 = w.clone()
        lk.merge_(w, a, b, 1.3, backend=backend)
        merged = w.clone()
        # merging rounds at the merged value's scale: that ulp bounds what any unmerge can recover
        ulp = torch.finfo(dt).eps * torch.maximum(w0.float().abs(), merged.float().abs())
        first = None
        for _ in range(20):
            lk.unmerge_(w, a, b, 1.3, backend=backend)
            assert ((w.float() - w0.float()).abs() <= ulp).all(), "drift over 1 ulp"
            first = w.clone() if first is None else first
            assert torch.equal(w.view(torch.uint8), first.view(torch.uint8)), "drift grew across cycles"
            lk.merge_(w, a, b, 1.3, backend=backend)
            assert torch.equal(w.view(torch.uint8), merged.view(torch.uint8)), f"re-merge not bit-equal ({dt})"


def test_reference_unmerge_inverts_merge_exactly_when_possible():
    w, a, b = _adapters(64, 64, 4, torch.bfloat16)
    delta = reference.lora_delta(a, b, 0.5)
    m = reference.merged_value(w, delta)
    u = reference.unmerged_value(m, delta)
    assert torch.equal(reference.merged_value(u, delta), m)


def test_failed_validation_leaves_weight_untouched():
    w, a, b = _adapters(16, 24, 4, torch.float32)
    before = w.clone()
    bad_calls = [
        lambda: lk.merge_(w, a[:, :10], b, 1.0),
        lambda: lk.merge_(w, a, b[:, :2], 1.0),
        lambda: lk.merge_(w, a, b, float("nan")),
        lambda: lk.unmerge_(w, a, b, float("inf")),
        lambda: lk.merge_(w, a, b, 1.0, backend="nope"),
        lambda: lk.merge_(w.t(), a, b, 1.0),
    ]
    for call in bad_calls:
        with pytest.raises((ValueError, TypeError)):
            call()
        assert torch.equal(w.view(torch.uint8), before.view(torch.uint8))


@pytest.mark.parametrize("backend", ["torch"] + [f"triton-{d}" for d in TRITON_DEVICES]
                         + (["cuda"] if lk.cuda_ext_available() and torch.cuda.is_available() else []))
def test_merge_after_forward_refuses_the_stale_backward(backend):
    """Eager merges skip the custom-op layer; W's version must still move, so a backward that saved W before
    the merge raises instead of using the merged weight."""
    backend, _, device = backend.partition("-")
    device = device or ("cuda" if backend == "cuda" else "cpu")
    x = torch.randn(5, 16, device=device, requires_grad=True)
    w = torch.randn(8, 16, device=device)
    a = torch.randn(4, 16, device=device, requires_grad=True)
    b = torch.randn(8, 4, device=device, requires_grad=True)
    y = lk.lora_linear(x, w, a, b, 0.5, backend="torch" if backend == "torch" else backend)
    before = w._version
    lk.merge_(w, a.detach(), b.detach(), 0.5, backend=backend)
    assert w._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_grids_fill_whole_waves_of_resident_programs():
    """Merge and split-K size their grids from how many of the compiled kernel's CTAs an SM holds (a
    151-register, 40 KB variant: 3), so that no nearly empty wave trails."""
    from lora_kernels.triton import merge as mg, waves
    assert waves.ctas_per_sm(151, 4, 40960) == 3                  # registers bound
    assert waves.ctas_per_sm(128, 4, 40960) == 4
    assert waves.ctas_per_sm(64, 8, 100 * 1024) == 2              # shared memory bound
    assert waves.ctas_per_sm(32, 4, 0) == 16                      # threads bound
    variant = ("test variant",)
    waves._resident[variant] = 3
    like = torch.empty(1)
    slots = 3 * mg.configs.sm_count(like)
    try:
        for units, k_max in ((4, 16), (7, 16), (slots - 1, 16), (1000, 16), (5, 2)):
            k = waves.per_unit(units, k_max, like, variant)
            assert 1 <= k <= k_max
            fills = [(j * units / slots) / -(-j * units // slots) for j in range(1, k_max + 1)]
            good = [j + 1 for j, f in enumerate(fills) if f >= 0.9]
            assert k == (good[0] if good else fills.index(max(fills)) + 1)  # the fewest programs that fill waves
        assert waves.per_unit(4, 16, like, variant) * 4 == slots           # here: exactly one full wave
        assert mg._row_programs(4, 64, 1, like, variant) == waves.per_unit(4, 16, like, variant)
    finally:
        del waves._resident[variant]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dt", [torch.float32, torch.float16])
def test_merged_copy_gives_merge_bits_and_leaves_w_alone(device, dt):
    """The merge kernel writing to a new tensor (auto's merged-weight forward): the bits merge_ leaves in W,
    with W itself unchanged."""
    from lora_kernels.triton import merge
    w, a, b = (t.to(device) for t in _adapters(40, 70, 5, dt))
    before = w.clone()
    out = merge.merged_copy(w, a, b, 0.6)
    want = lk.merge_(w.clone(), a, b, 0.6, backend="triton")
    assert torch.equal(w, before) and torch.equal(out.view(torch.uint8), want.view(torch.uint8))
