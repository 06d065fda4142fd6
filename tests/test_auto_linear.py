"""`auto` for the fused linear on a GPU: each shape and mode is timed once on every candidate (the built
backends, and the unfused addmm composite where the CUDA extension is not built), the fastest serves it, and
the timing leaves no trace (generators restored, no gradient accumulated). Timing is stubbed here, and a
named backend stands in for the kernels, so the rule itself runs on the CPU."""
import os
from types import SimpleNamespace

import pytest
import torch

import lora_kernels as lk
from lora_kernels import auto_linear
from helpers import TRITON_DEVICES

pytestmark = pytest.mark.skipif(not lk.triton_available(), reason="the measured choice lives in the Triton package")


@pytest.fixture
def timed(monkeypatch):
    """Calls per backend, and a stand-in timer that reports `times[backend]` for whichever backend ran."""
    from lora_kernels.triton import measured
    monkeypatch.setattr(measured, "_chosen", {})
    monkeypatch.setattr(measured, "_timings", {})
    monkeypatch.setattr(measured.configs, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)
    monkeypatch.delenv(auto_linear.ENV, raising=False)
    monkeypatch.setattr(auto_linear._backends, "cuda_ext_available", lambda: True)
    state = SimpleNamespace(calls=[], times={"cuda": 2.0, "triton": 1.0, "addmm": 3.0})
    def addmm_linear(x, w, a, b, bias, s, dropout_p=0.0):  # the reference stands in for the composite too
        state.calls.append("addmm")
        return lk.lora_linear(x, w, a, b, s, bias, dropout_p=dropout_p, backend="torch")
    monkeypatch.setattr(auto_linear, "addmm_linear", addmm_linear)

    def linear(x, w, a, b, s, bias, dropout_p, backend):
        state.calls.append(backend)
        return lk.lora_linear(x, w, a, b, s, bias, dropout_p=dropout_p, backend="torch")

    def cold_ms(fn, reps=10):
        first = len(state.calls)
        fn()
        return state.times[state.calls[first]]
    monkeypatch.setattr(measured, "cold_ms", cold_ms)
    state.gpu_times = {"cuda": 2.0, "triton": 1.0, "addmm": 3.0}

    def gpu_ms(fn, reps=20):
        first = len(state.calls)
        fn()
        return state.gpu_times[state.calls[first]]
    monkeypatch.setattr(measured, "gpu_ms", gpu_ms)
    state.linear = linear
    return state


def _inputs():
    torch.manual_seed(0)
    return (torch.randn(64, 32, requires_grad=True), torch.randn(24, 32), torch.randn(4, 32, requires_grad=True),
            torch.randn(24, 4, requires_grad=True))


def test_faster_backend_chosen_once_per_shape_and_mode_without_a_trace(timed):
    x, w, a, b = _inputs()
    rng = torch.get_rng_state()
    assert auto_linear.linear_backend(timed.linear, x, w, a, b, None, 0.5, 0.1) == "triton"
    assert set(timed.calls) == {"cuda", "triton"}
    assert torch.equal(torch.get_rng_state(), rng), "the timing's dropout draws moved the generator"
    assert x.grad is None and a.grad is None and b.grad is None, "the timing accumulated gradients"
    timed.calls.clear()
    assert auto_linear.linear_backend(timed.linear, x, w, a, b, None, 0.5, 0.1) == "triton" and not timed.calls
    timed.times.update(cuda=0.5)
    with torch.no_grad():  # forward only: a key of its own, timed on its own
        assert auto_linear.linear_backend(timed.linear, x, w, a, b, None, 0.5, 0.1) == "cuda"
    assert auto_linear.linear_backend(timed.linear, x[:3], w, a, b, None, 0.5, 0.1) == "cuda"  # another row bucket


def test_the_choice_is_logged_with_the_times_that_decided_it(timed, monkeypatch, caplog):
    monkeypatch.setattr(auto_linear._backends, "_said", set())
    x, w, a, b = _inputs()
    with caplog.at_level("INFO", logger=auto_linear._backends.log.name):
        assert auto_linear.linear_backend(timed.linear, x, w, a, b, None, 0.5, 0.0) == "triton"
    line = next(r.getMessage() for r in caplog.records if "fused linear" in r.getMessage())
    assert "-> triton backend" in line and "cuda 2.000 ms" in line and "triton 1.000 ms" in line, line


def test_forced_by_environment_and_never_timed_inside_a_backward(timed, monkeypatch):
    x, w, a, b = _inputs()
    monkeypatch.setattr(torch._C, "_current_autograd_node", lambda: object())
    assert auto_linear.linear_backend(timed.linear, x, w, a, b, None, 0.5, 0.0) == "cuda" and not timed.calls
    monkeypatch.setenv(auto_linear.ENV, "triton")
    assert auto_linear.linear_backend(timed.linear, x, w, a, b, None, 0.5, 0.0) == "triton" and not timed.calls


def test_the_addmm_composite_serves_where_it_is_fastest_without_the_extension(timed, monkeypatch):
    """Without the extension the choice is between Triton and the composite, which serves where it measures
    fastest (host-bound calls), with dropout too (it keeps what the fused op keeps). With the extension it is
    not timed: the extension runs the same cuBLAS products from one C++ call, so the composite could only win
    by timing noise."""
    x, w, a, b = _inputs()
    timed.times.update(addmm=0.5)
    assert auto_linear.linear_backend(timed.linear, x, w, a, b, None, 0.5, 0.0) == "triton"
    assert set(timed.calls) == {"cuda", "triton"}
    monkeypatch.setenv(auto_linear.ENV, "addmm")  # still forcible by the variable, untimed
    timed.calls.clear()
    assert auto_linear.linear_backend(timed.linear, x, w, a, b, None, 0.5, 0.1) == "addmm" and not timed.calls
    monkeypatch.delenv(auto_linear.ENV)
    monkeypatch.setattr(auto_linear._backends, "cuda_ext_available", lambda: False)
    timed.calls.clear()
    assert auto_linear.linear_backend(timed.linear, x, w, a, b, None, 0.5, 0.1, default="triton") == "addmm"
    assert set(timed.calls) == {"triton", "addmm"}
    timed.calls.clear()
    timed.times.update(addmm=1.5)
    with torch.no_grad():
        assert auto_linear.linear_backend(timed.linear, x, w, a, b, None, 0.5, 0.0, default="triton") == "triton"
    assert set(timed.calls) == {"triton", "addmm"}


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("with_bias", [True, False])
def test_the_addmm_composite_meets_the_oracle_rule(device, p, full, with_bias):
    """The composite auto may pick: output and every gradient against float64 with the same dropout mask,
    within twice the error of the unfused arithmetic done by autograd in the working dtype (16-bit, and float32,
    whose products must not drop to TF32); float32 adapters, a bias, a 3-D input and odd sizes. With dropout
    its mask is the fused kernels' (the seed drawn the same way) and it keeps only x and x·Aᵀ for backward."""
    from lora_kernels import ops, reference
    dt = torch.float32 if full else (torch.float16 if device == "cpu" else torch.bfloat16)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 13, 40, generator=g).to(dt).to(device)
    w = (torch.randn(24, 40, generator=g) / 6).to(dt).to(device)
    a = (torch.randn(5, 40, generator=g) / 6).to(device)
    b = (torch.randn(24, 5, generator=g) / 2).to(device)
    bias = torch.randn(24, generator=g).to(dt).to(device)
    dy = torch.randn(3, 13, 24, generator=g).to(dt).to(device)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, a, b, bias)]
    torch.manual_seed(5)
    y = auto_linear.addmm_linear(leaves[0], w, leaves[1], leaves[2], leaves[3] if with_bias else None, 0.75, p)
    y.backward(dy)
    torch.manual_seed(5)
    seed = ops._seed_from_generator(x) if p > 0 else None            # the draw the composite made

    def unfused(dtype):
        ins = [t.detach().clone().to(dtype if t.dtype == dt else (torch.float64 if dtype == torch.float64
                                                                   else t.dtype)).requires_grad_(True)
               for t in (x, a, b, bias)]
        out = reference.lora_linear(ins[0], w.to(dtype), ins[1], ins[2], 0.75, ins[3] if with_bias else None,
                                    dropout_p=p, seed=seed)
        out.backward(dy.to(dtype))
        return [out] + [t.grad for t in ins[:3 + with_bias]]
    want, plain = unfused(torch.float64), unfused(dt)
    for got, ref, base in zip([y] + [t.grad for t in leaves[:3 + with_bias]], want, plain):
        assert got.dtype == base.dtype and got.shape == base.shape
        err = (got.double() - ref).abs().max().item()
        assert err <= 2 * (base.double() - ref).abs().max().item() + 1e-6, err
    if p > 0:  # the mask is the fused kernels' one: the kernel equals the reference's torch form bit for bit
        from lora_kernels.triton import dropout
        x2d = x.reshape(-1, 40)
        assert torch.equal(dropout.apply(x2d, p, seed), reference.apply_dropout(x2d, p, seed))


def test_applies_only_where_auto_resolved_to_a_gpu_backend_for_gpu_tensors(monkeypatch):
    monkeypatch.setattr(auto_linear._backends, "triton_available", lambda: True)
    gpu = SimpleNamespace(is_cuda=True)
    assert auto_linear.applies("auto", "cuda", gpu, None)
    assert auto_linear.applies("auto", "triton", gpu, None)                        # no extension built
    assert not auto_linear.applies("cuda", "cuda", gpu, None)                      # a backend named by the user
    assert not auto_linear.applies("auto", "torch", gpu, None)
    assert not auto_linear.applies("auto", "cuda", gpu, torch.tensor(0.5))
    assert not auto_linear.applies("auto", "cuda", SimpleNamespace(is_cuda=False), None)
    monkeypatch.setattr(auto_linear._backends, "triton_available", lambda: False)
    assert not auto_linear.applies("auto", "cuda", gpu, None)


def test_not_timed_inside_graph_capture(timed, monkeypatch):
    x, w, a, b = _inputs()
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert auto_linear.linear_backend(timed.linear, x, w, a, b, None, 0.5, 0.1) == "cuda" and not timed.calls
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert auto_linear.linear_backend(timed.linear, x, w, a, b, None, 0.5, 0.1) == "triton"  # decided when eager


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and lk.cuda_ext_available()), reason="needs a GPU and the extension")
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_auto_on_gpu_gives_the_bits_of_the_backend_it_chose(monkeypatch, p):
    """The real rule on a GPU: both backends timed once, the choice stored, and the call's result (dropout mask
    included) bit-equal to calling the chosen backend by name from the same generator state."""
    from lora_kernels.triton import measured
    from helpers import make_inputs
    monkeypatch.setattr(measured, "_chosen", {})
    monkeypatch.delenv(auto_linear.ENV, raising=False)
    x, w, a, b, bias = make_inputs(512, 256, 384, 16, torch.bfloat16, device="cuda", adapter_dtype=torch.float32)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, a, b)]
    torch.manual_seed(7)
    y = lk.lora_linear(leaves[0], w, leaves[1], leaves[2], 0.5, bias, dropout_p=p)
    assert all(t.grad is None for t in leaves), "the timing accumulated gradients"
    chosen = [v for k, v in measured._chosen.items() if k[0] == "auto linear"]
    assert len(chosen) == 1 and chosen[0] in auto_linear.candidates()
    torch.manual_seed(7)
    if chosen[0] == auto_linear.ADDMM:
        again = auto_linear.addmm_linear(leaves[0], w, leaves[1], leaves[2], bias, 0.5, p)
    else:
        again = lk.lora_linear(leaves[0], w, leaves[1], leaves[2], 0.5, bias, dropout_p=p, backend=chosen[0])
    assert torch.equal(y, again)


def test_graph_captures_take_the_pick_by_gpu_time(timed, monkeypatch):
    """Forward-only keys get a second pick by GPU time on their first eager call; a capture takes it (a replay
    has no host time), eager calls keep the wall-time pick, and keys with a backward keep theirs in captures."""
    x, w, a, b = _inputs()
    timed.times.update(cuda=1.0, triton=3.0)        # the host-bound eager timing favours the extension
    timed.gpu_times.update(cuda=2.0, triton=1.0)    # the kernels alone favour Triton
    with torch.no_grad():
        assert auto_linear.linear_backend(timed.linear, x, w, a, b, None, 0.5, 0.0) == "cuda"
        timed.calls.clear()
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        assert auto_linear.linear_backend(timed.linear, x, w, a, b, None, 0.5, 0.0) == "triton"
        assert not timed.calls, "timed inside a capture"
        monkeypatch.setenv(auto_linear.ENV, "cuda")
        assert auto_linear.linear_backend(timed.linear, x, w, a, b, None, 0.5, 0.0) == "cuda"
        monkeypatch.delenv(auto_linear.ENV)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
        assert auto_linear.linear_backend(timed.linear, x, w, a, b, None, 0.5, 0.0) == "cuda"
    assert auto_linear.linear_backend(timed.linear, x, w, a, b, None, 0.5, 0.0) == "cuda"  # training: wall only
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert auto_linear.linear_backend(timed.linear, x, w, a, b, None, 0.5, 0.0) == "cuda"


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and lk.cuda_ext_available()), reason="needs a GPU and the extension")
def test_cuda_graph_replay_gives_the_bits_of_the_graph_pick(monkeypatch):
    """A forward captured after an eager warm-up replays the backend picked by GPU time, bit for bit."""
    from lora_kernels.triton import measured
    from helpers import make_inputs
    monkeypatch.setattr(measured, "_chosen", {})
    monkeypatch.delenv(auto_linear.ENV, raising=False)
    x, w, a, b, bias = make_inputs(16, 1024, 768, 16, torch.bfloat16, device="cuda")
    with torch.no_grad():
        lk.lora_linear(x, w, a, b, 0.5, bias)                     # eager: both picks made here
        picks = {k[0]: v for k, v in measured._chosen.items() if k[0].startswith("auto linear")}
        assert set(picks) == {"auto linear", "auto linear, CUDA graph"}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            lk.lora_linear(x, w, a, b, 0.5, bias)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = lk.lora_linear(x, w, a, b, 0.5, bias)
        graph.replay()
        torch.cuda.synchronize()
        pick = picks["auto linear, CUDA graph"]
        want = (auto_linear.addmm_linear(x, w, a, b, bias, 0.5) if pick == auto_linear.ADDMM
                else lk.lora_linear(x, w, a, b, 0.5, bias, backend=pick))
    assert torch.equal(y, want)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("with_dx", [True, False])
def test_masked_low_rank_backward_in_one_pass(device, with_dx):
    """The composite's backward kernel: dA = gᵀ·dropout(x) summed over row splits in a fixed order, and
    dx += mask ⊙ (g·A)/(1-p), against the same steps in torch with the reference mask; odd sizes, several
    row splits, the same result on a second call."""
    from lora_kernels import reference
    from lora_kernels.triton import dropout
    dt = torch.float16 if device == "cpu" else torch.bfloat16
    g0 = torch.Generator().manual_seed(3)
    M, K, R, p = 600, 72, 5, 0.2
    x = torch.randn(M, K, generator=g0).to(dt).to(device)
    g = (torch.randn(M, R, generator=g0) / 4).to(dt).to(device)
    a = (torch.randn(R, K, generator=g0) / 4).to(dt).to(device)
    seed = torch.tensor(12345, dtype=torch.int64, device=device)
    dx0 = torch.randn(M, K, generator=g0).to(dt).to(device)
    dx = dx0.clone() if with_dx else None
    dA = dropout.lowrank_backward(x, g, a, dx, p, seed)
    want_dA = g.double().t() @ reference.apply_dropout(x, p, seed).double()
    assert dA.dtype == torch.float32 and dA.shape == (R, K)
    torch.testing.assert_close(dA.double(), want_dA, rtol=1e-5, atol=1e-5)
    assert torch.equal(dA, dropout.lowrank_backward(x, g, a, None, p, seed))
    if with_dx:
        want_dx = (dx0.float() + reference.apply_dropout((g.float() @ a.float()).to(dt), p, seed).float()).to(dt)
        torch.testing.assert_close(dx, want_dx, rtol=0, atol=float(want_dx.abs().max()) * 2 ** -9)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_masked_composite_with_only_B_trainable(device):
    """x and A frozen: the composite's backward skips the pass over x and still gives B's gradient (the same as
    with everything trainable, the same seed)."""
    dt = torch.float16 if device == "cpu" else torch.bfloat16
    g = torch.Generator().manual_seed(2)
    x = torch.randn(50, 24, generator=g).to(dt).to(device)
    w = (torch.randn(16, 24, generator=g) / 4).to(dt).to(device)
    a = (torch.randn(4, 24, generator=g) / 4).to(device)
    dy = torch.randn(50, 16, generator=g).to(dt).to(device)
    grads = []
    for all_trainable in (False, True):
        b = (torch.randn(16, 4, generator=torch.Generator().manual_seed(9)) / 2).to(device).requires_grad_(True)
        xs, As = x.clone().requires_grad_(all_trainable), a.clone().requires_grad_(all_trainable)
        torch.manual_seed(4)
        auto_linear.addmm_linear(xs, w, As, b, None, 0.5, 0.25).backward(dy)
        assert (xs.grad is None and As.grad is None) != all_trainable
        grads.append(b.grad)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_composite_takes_strided_inputs(device, p):
    """A 3-D x whose last dimension is strided (a slice every other column): the composite gives what it gives
    for the same values laid out contiguously, gradient included."""
    g = torch.Generator().manual_seed(8)
    base = torch.randn(2, 7, 48, generator=g).half().to(device)
    w = (torch.randn(12, 24, generator=g) / 4).half().to(device)
    a, b = (torch.randn(4, 24, generator=g) / 4).to(device), (torch.randn(12, 4, generator=g) / 2).to(device)
    dy = torch.randn(2, 7, 12, generator=g).half().to(device)
    outs = []
    for x in (base[..., ::2].detach().requires_grad_(True), base[..., ::2].contiguous().requires_grad_(True)):
        torch.manual_seed(1)
        y = auto_linear.addmm_linear(x, w, a, b, None, 0.5, p)
        y.backward(dy)
        outs.append((y, x.grad))
    assert outs[0][0].shape == (2, 7, 12)
    # (a GPU library may pick another algorithm for a strided operand: the same values, not always the same bits)
    exact = dict(rtol=0, atol=0) if device == "cpu" else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(outs[0][0], outs[1][0], **exact)
    torch.testing.assert_close(outs[0][1], outs[1][1], **exact)


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_the_composite_forward_through_a_merged_weight_meets_the_oracle_rule(monkeypatch, dt, with_bias):
    """With nothing to differentiate and no dropout the composite may run y = x·(W + s·B·A)ᵀ, one GEMM on a
    merged copy of W (auto_linear.merged_weight_pays): forced on, off and by its rule (96 rows of 40: it takes
    the merged path, the same bits as forcing it), each within twice the unfused arithmetic's error."""
    from lora_kernels import reference
    g = torch.Generator().manual_seed(3)
    x = torch.randn(96, 40, generator=g).to(dt)
    w = (torch.randn(24, 40, generator=g) / 6).to(dt)
    a, b = torch.randn(8, 40, generator=g) / 6, torch.randn(24, 8, generator=g) / 2
    bias = torch.randn(24, generator=g).to(dt) if with_bias else None
    exact = reference.lora_linear(x.double(), w.double(), a.double(), b.double(), 0.75,
                                  bias.double() if with_bias else None)
    plain = reference.lora_linear(x, w, a.to(dt), b.to(dt), 0.75, bias)
    assert auto_linear.merged_weight_pays(96, 24, 24 * 40, 96 * 40, 2)
    ys = {}
    for force in ("1", "0", None):
        if force is None:
            monkeypatch.delenv("LORA_KERNELS_MERGED_WEIGHT", raising=False)
        else:
            monkeypatch.setenv("LORA_KERNELS_MERGED_WEIGHT", force)
        with torch.no_grad():
            ys[force] = auto_linear.addmm_linear(x, w, a, b, bias, 0.75)
        err = (ys[force].double() - exact).abs().max().item()
        assert ys[force].dtype == dt and err <= 2 * (plain.double() - exact).abs().max().item() + 1e-6, (force, err)
    assert torch.equal(ys[None], ys["1"])


def test_cached_calls_follow_the_forcing_variables(monkeypatch):
    """The per-call key (ops._call_key) reads LORA_KERNELS_AUTO and LORA_KERNELS_MERGED_WEIGHT through the dict
    behind os.environ (_env.get): every change made through os.environ must change the key, and undoing it restore it."""
    from lora_kernels import ops

    monkeypatch.delenv(auto_linear.ENV, raising=False)
    monkeypatch.delenv(auto_linear.MERGED_ENV, raising=False)
    x, w, a, b = _inputs()

    def key():
        return ops._call_key(x, w, a, b, None, 0.0, "auto", False)
    unset = key()
    seen = {unset}
    for name, value in [(auto_linear.ENV, "triton"), (auto_linear.ENV, "cuda"), (auto_linear.MERGED_ENV, "0")]:
        monkeypatch.setenv(name, value)
        assert key() not in seen, (name, value)
        seen.add(key())
        monkeypatch.delenv(name)
    assert key() == unset
    os.environ[auto_linear.ENV] = "torch"  # a plain assignment, as a user's script makes it
    try:
        assert key() != unset
    finally:
        del os.environ[auto_linear.ENV]
    assert key() == unset


def test_env_reader_answers_as_os_environ_does(monkeypatch):
    from lora_kernels import _env

    name = "LORA_KERNELS_TEST_ENV_READER"
    monkeypatch.delenv(name, raising=False)
    assert _env.get(name) is None
    for value in ["1", "", "triton", "dense é"]:
        monkeypatch.setenv(name, value)
        assert _env.get(name) == os.environ.get(name) == value
    monkeypatch.delenv(name)
    assert _env.get(name) is None
