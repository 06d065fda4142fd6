"""Property-based: the oracle rule over random shapes, ranks, dtypes, strides, bias and dropout."""
import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, seed, settings
from hypothesis import strategies as st

from helpers import make_inputs, oracle_check

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
# Derandomised: the same examples on every run, so a CI result is reproducible (a failure seen once is seen again).
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


def _case(draw, dtypes, max_dim):
    return dict(M=draw(st.integers(1, max_dim)), K=draw(st.integers(1, max_dim)), N=draw(st.integers(1, max_dim)),
                r=draw(st.integers(1, 20)), dtype=draw(st.sampled_from(dtypes)), bias=draw(st.booleans()),
                layout=draw(st.sampled_from(["contiguous", "noncontig", "3d"])),
                fp32_adapters=draw(st.booleans()), p=draw(st.sampled_from([0.0, 0.3])),
                scaling=draw(st.floats(0.05, 4.0)))


def _run(c, backend):
    # When rows, N or K times r is below ~8, a gradient hinges on a few roundings and "2x the composite's error" is
    # a coin flip, not a property (seen for the reference backend too: M = 1, r = 1, float32 dA at 6x the
    # composite's error of 4e-6); the fixed-shape tests in test_ops.py cover those shapes.
    rows = c["M"] * (3 if c["layout"] == "3d" else 1)
    assume(min(rows, c["N"], c["K"]) * c["r"] >= 8)
    inputs = make_inputs(c["M"], c["K"], c["N"], c["r"], c["dtype"], bias=c["bias"],
                         noncontig=c["layout"] == "noncontig", x_3d=c["layout"] == "3d",
                         adapter_dtype=torch.float32 if c["fp32_adapters"] else None)
    got = oracle_check(*inputs, scaling=c["scaling"], dropout_p=c["p"], backend=backend)
    assert got[0].shape[-1] == c["N"] and got[1].shape == inputs[0].shape


@settings(max_examples=60, **SETTINGS)
@given(st.data())
def test_torch_backend_property(data):
    _run(_case(data.draw, [torch.float32, torch.bfloat16, torch.float16], 80), "torch")


@pytest.mark.skipif(not INTERP, reason="interpreter property run where there is no GPU")
@settings(max_examples=25, **SETTINGS)
@given(st.data())
def test_triton_interpreter_property(data):
    _run(_case(data.draw, [torch.float32, torch.float16], 48), "triton")


def _gpu_backends():
    import lora_kernels as lk
    return ["triton"] + (["cuda"] if lk.cuda_ext_available() else [])


GPU_EXAMPLES, GPU_PARTS = 200, 10


def _gpu_property(backend, part):
    """200 examples per backend, in GPU_PARTS tests of their own seeds: on the GPU nearly every example
    compiles new kernel variants (dtype, flags, divisibility), so one 200-example test outran any shard's
    time; parts defined one after another land on different shards (tests/conftest.py)."""
    @pytest.mark.gpu
    @seed(1000 * (part + 1))
    @settings(max_examples=GPU_EXAMPLES // GPU_PARTS, deadline=None, suppress_health_check=[HealthCheck.too_slow],
              database=None)
    @given(st.data())
    def test(data):
        c = _case(data.draw, [torch.float32, torch.bfloat16, torch.float16], 300)
        assume(min(c["M"] * (3 if c["layout"] == "3d" else 1), c["N"], c["K"]) * c["r"] >= 8)
        inputs = make_inputs(c["M"], c["K"], c["N"], c["r"], c["dtype"], bias=c["bias"], device="cuda",
                             noncontig=c["layout"] == "noncontig", x_3d=c["layout"] == "3d",
                             adapter_dtype=torch.float32 if c["fp32_adapters"] else None)
        got = oracle_check(*inputs, scaling=c["scaling"], dropout_p=c["p"], backend=backend)
        assert got[0].shape[-1] == c["N"] and got[1].shape == inputs[0].shape
    return test


for _backend in _gpu_backends():
    for _part in range(GPU_PARTS):
        globals()[f"test_gpu_property_{_backend}_{_part}"] = _gpu_property(_backend, _part)
