"""GPU checks (run on a CUDA machine): the oracle rule over many random shapes per backend."""
import random

import pytest
import torch

import lora_kernels as lk
from helpers import SEED_HIGH, make_inputs, oracle_check

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _shape(i):
    rnd = random.Random(i)
    M = rnd.choice([1, 2, 3, 7, 16, 17, 64, 100, 257, 1000, 2048])
    K = rnd.choice([16, 33, 64, 100, 255, 512, 1000, 4096])
    N = rnd.choice([8, 17, 64, 129, 500, 1024, 3000])
    r = rnd.choice([1, 2, 8, 16, 33, 64, 128, 256])
    return M, K, N, r


def _backends():
    out = ["triton"] if lk.triton_available() else []
    return out + (["cuda"] if lk.cuda_ext_available() else [])


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("case", range(60))
def test_oracle_random_shapes(backend, case):
    M, K, N, r = _shape(case)
    dtype = DTYPES[case % 3]
    p = 0.1 if case % 2 else 0.0
    inputs = make_inputs(M, K, N, r, dtype, device="cuda", bias=case % 4 != 0,
                         adapter_dtype=torch.float32 if case % 5 == 0 else None,
                         x_3d=case % 7 == 0, noncontig=case % 11 == 0)
    oracle_check(*inputs, dropout_p=p, backend=backend, seed=case)


@pytest.mark.skipif(not lk.cuda_ext_available(), reason="needs the CUDA extension")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M, K, r", [(1, 4096, 16), (2, 33, 4), (1, 100, 256), (2, 4096, 64), (3, 4096, 16),
                                     (5, 136, 8), (8, 1000, 16), (7, 33, 4), (9, 136, 8), (12, 1000, 1),
                                     (16, 4096, 64), (13, 4104, 16), (16, 136, 65), (17, 136, 8)])
@pytest.mark.parametrize("adapter_fp32", [False, True])
def test_cuda_decode_kernel(dtype, M, K, r, adapter_fp32):
    """The CUDA decode path (its x·Aᵀ kernel, then one pass over W): 16-bit x on tensor cores up to 8 rows,
    and 9 to 16 rows as the 16-row form with x·Aᵀ in slices of K (K = 4104 ends on a partial slice; r = 65
    is past its rank limit: composite), K = 136, 1000 and 4104 end on a partial 128-k step, 300 columns on a
    partial 16-column tile; float32 x and K = 33 by FMAs up to 2 rows and the composite beyond (M = 7), as
    past 16 rows (M = 17); rows·r >= 8 as in the property tests (below that a gradient hinges on one or two
    roundings), adapters in x's dtype or float32, every gradient (dB reads the x·Aᵀ it saved)."""
    inputs = make_inputs(M, K, 300, r, dtype, device="cuda", bias=M == 1,
                         adapter_dtype=torch.float32 if adapter_fp32 else None)
    oracle_check(*inputs, dropout_p=0.0, backend="cuda", seed=M * K + r)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_unmerge_gpu(backend, dtype):
    N, K, r = 1000, 777, 16
    w = torch.randn(N, K, device="cuda").to(dtype)
    a = torch.randn(r, K, device="cuda") / K**0.5
    b = torch.randn(N, r, device="cuda")
    w0 = w.clone()
    lk.merge_(w, a, b, 1.5, backend=backend)
    expect = w0.double() + (b.double() @ a.double()) * 1.5
    ulp = torch.finfo(dtype).eps * expect.abs()
    assert ((w.double() - expect).abs() <= ulp + 1e-5 * expect.abs() + 1e-6).all()
    merged = w.clone()
    for _ in range(100):
        lk.unmerge_(w, a, b, 1.5, backend=backend)
        lk.merge_(w, a, b, 1.5, backend=backend)
        assert torch.equal(w.view(torch.uint8), merged.view(torch.uint8))
    lk.unmerge_(w, a, b, 1.5, backend=backend)
    bound = torch.finfo(dtype).eps * torch.maximum(w0.float().abs(), merged.float().abs())
    assert ((w.float() - w0.float()).abs() <= bound).all()


def test_dropout_mask_same_on_gpu_and_cpu():
    x, w, a, b, bias = make_inputs(33, 70, 45, 8, torch.float32, device="cuda")
    oracle_check(x, w, a, b, bias, dropout_p=0.3, backend="triton")


def test_compile_fullgraph_triton_backend():
    torch._dynamo.reset()
    x, w, a, b, bias = make_inputs(64, 256, 128, 16, torch.bfloat16, device="cuda")
    a.requires_grad_()

    def f(x, a):
        return lk.lora_linear(x, w, a, b, 0.5, bias, dropout_p=0.1, backend="triton")

    torch.manual_seed(0)
    eager = f(x, a)
    torch.manual_seed(0)
    compiled = torch.compile(f, fullgraph=True)(x, a)
    torch.testing.assert_close(compiled, eager)


def test_module_on_gpu_matches_merged():
    m = lk.FusedLoRALinear(512, 384, r=16, lora_alpha=32, device="cuda", dtype=torch.bfloat16)
    torch.nn.init.normal_(m.lora_B, std=0.02)
    x = torch.randn(2, 50, 512, device="cuda", dtype=torch.bfloat16)
    y = m(x)
    m.merge()
    torch.testing.assert_close(m(x), y, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not lk.cuda_ext_available(), reason="lora_kernels._C is not built")
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_cuda_eager_cpp_path_equals_custom_op_path(p):
    """The eager C++ autograd op and the registered custom ops (what torch.compile traces) run the same
    kernels with the same seed: output and every gradient bit-identical."""
    from lora_kernels import ops
    x, w, a, b, bias = make_inputs(300, 1000, 500, 16, torch.bfloat16, device="cuda", adapter_dtype=torch.float32,
                                   x_3d=True)
    dy = torch.randn(300, 3, 500, device="cuda", dtype=torch.bfloat16)
    outs = []
    for eager in (ops._eager, lambda *t: False):
        saved, ops._eager = ops._eager, eager
        try:
            torch.manual_seed(3)
            leaves = [t.detach().clone().requires_grad_(True) for t in (x, a, b, bias)]
            y = lk.lora_linear(leaves[0], w, leaves[1], leaves[2], 0.5, leaves[3], dropout_p=p, backend="cuda")
            y.backward(dy)
            outs.append([y.detach()] + [t.grad for t in leaves])
        finally:
            ops._eager = saved
    for got, want in zip(*outs):
        assert torch.equal(got, want)


@pytest.mark.skipif(not lk.cuda_ext_available(), reason="lora_kernels._C is not built")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("cols", [70, 4096, 5632])
def test_cuda_dropout_kernel_matches_reference_mask(dtype, cols):
    from lora_kernels import reference
    x = torch.randn(37, cols, device="cuda").to(dtype)
    seed = torch.tensor(987654321, device="cuda")
    got = torch.ops.lora_kernels.dropout(x, seed, 0.3)
    assert torch.equal(got.cpu(), reference.apply_dropout(x.cpu(), 0.3, seed.cpu()))


@pytest.mark.skipif(not lk.cuda_ext_available(), reason="lora_kernels._C is not built")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M, K, r", [(1000, 4096, 16), (333, 70, 1), (257, 99, 17), (64, 1000, 33), (700, 512, 64),
                                     (50, 256, 65)])
def test_cuda_dropout_backward_ranks_and_frozen_x(dtype, M, K, r):
    """The extension's dropout backward at ranks 1 to 65, odd K and few rows, under the oracle rule; without a
    gradient for x (dropout(x) then comes from the plain mask kernel instead of the paired one) the adapters'
    gradients are the same bits."""
    x, w, a, b, bias = make_inputs(M, K, 48, r, dtype, device="cuda", adapter_dtype=torch.float32)
    got = oracle_check(x, w, a, b, bias, scaling=0.75, dropout_p=0.2, backend="cuda", seed=M + r)
    torch.manual_seed(M + r)  # oracle_check's draws: its seed tensor, then dy
    torch.randint(0, SEED_HIGH, (), device="cuda", dtype=torch.int64)
    dy = torch.randn(M, 48, device="cuda", dtype=torch.float64)
    torch.manual_seed(M + r)
    leaves = [t.detach().clone().requires_grad_(True) for t in (a, b, bias)]
    y = lk.lora_linear(x.detach(), w, leaves[0], leaves[1], 0.75, leaves[2], dropout_p=0.2, backend="cuda")
    y.backward(dy.to(y.dtype))
    assert torch.equal(leaves[0].grad, got[2]) and torch.equal(leaves[1].grad, got[3])


@pytest.mark.skipif(not lk.cuda_ext_available(), reason="lora_kernels._C is not built")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M, K, r", [(17, 8, 1), (100, 72, 5), (257, 104, 8), (1000, 4104, 16), (4500, 1024, 16),
                                     (5, 136, 16), (33, 4096, 12), (300, 520, 17), (1000, 4104, 32), (70, 264, 27)])
@pytest.mark.parametrize("adapter_fp32", [False, True])
def test_cuda_masked_lowrank_kernels(dtype, M, K, r, adapter_fp32):
    """The masked low-rank kernels (csrc/cuda/masked_lowrank.cu: 16-bit x, K a multiple of 8, rank <= 32):
    x·Aᵀ with the mask applied as x is loaded, then dA and dx's low-rank term from one read of x. Rows past a
    16-row tile, K past a 32-column chunk (72, 104, 136, 264, 520) and a 256-column block (4104), ranks
    zero-padded to the 16- or 32-rank tile (17, 27), 5 rows behind the decode forward. Under the
    oracle rule; a second run gives the same bits (no atomics), and without a gradient for x the adapters'
    gradients are those bits too."""
    x, w, a, b, bias = make_inputs(M, K, 40, r, dtype, device="cuda",
                                   adapter_dtype=torch.float32 if adapter_fp32 else None)
    got = oracle_check(x, w, a, b, bias, scaling=0.5, dropout_p=0.15, backend="cuda", seed=M + K + r)
    dy = torch.randn(M, 40, device="cuda", dtype=dtype)
    runs = []
    for frozen_x in (False, False, True):
        torch.manual_seed(11)
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, a, b)]
        xx = leaves[0].detach() if frozen_x else leaves[0]
        lk.lora_linear(xx, w, leaves[1], leaves[2], 0.5, bias, dropout_p=0.15, backend="cuda").backward(dy)
        runs.append([t.grad for t in leaves])
    assert got[1].shape == x.shape and all(torch.equal(u, v) for u, v in zip(runs[0], runs[1]))
    assert runs[2][0] is None and torch.equal(runs[2][1], runs[0][1]) and torch.equal(runs[2][2], runs[0][2])


@pytest.mark.skipif(not lk.cuda_ext_available(), reason="lora_kernels._C is not built")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N, r, bias, adapter_fp32", [(8, 1, True, True), (36, 16, True, False), (264, 5, False, True),
                                                      (504, 32, True, True), (512, 17, False, False),
                                                      (2056, 32, True, True)])
def test_cuda_masked_forward_writes_the_lowrank_output(dtype, N, r, bias, adapter_fp32):
    """The masked x·Aᵀ launch also writes y's low-rank term s·(x·Aᵀ)·Bᵀ + bias where N is a multiple of 8 and
    at most 512 (36 and 2056 keep the cuBLAS form): one 8-column output, chunks past N (264, 504), odd and padded
    ranks, with and without bias, under the oracle rule (forward and gradients)."""
    x, w, a, b, bb = make_inputs(300, 264, N, r, dtype, device="cuda", bias=bias,
                                 adapter_dtype=torch.float32 if adapter_fp32 else None)
    oracle_check(x, w, a, b, bb, scaling=0.5, dropout_p=0.1, backend="cuda", seed=N + r)


@pytest.mark.skipif(not lk.cuda_ext_available(), reason="lora_kernels._C is not built")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_masked_step_replays_bit_equal_in_a_cuda_graph(dtype):
    """The masked path's kernels (adapter casts, masked x·Aᵀ with the low-rank output, masked backward, its
    slice reduction) go out as programmatic dependent launches on Hopper: a forward + backward with a fixed
    seed, captured in a CUDA graph and replayed on new inputs, gives the bits of the same calls run eagerly."""
    torch.manual_seed(7)
    x, w, a, b, bb = make_inputs(1000, 520, 264, 16, dtype, device="cuda", bias=True, adapter_dtype=torch.float32)
    dy = torch.randn(1000, 264, device="cuda", dtype=dtype)
    seed = torch.tensor(1234, device="cuda")
    ops = torch.ops.lora_kernels

    def step(inp):
        y, xa, A, B = ops.linear_forward_saved(inp, w, a, b, bb, 0.5, 0.1, seed)
        grads = ops.linear_backward_saved(dy, inp, w, A if A.numel() else a, B if B.numel() else b, xa, 0.5, True,
                                          True, 0.1, seed, a.dtype, b.dtype)
        return (y, xa) + tuple(grads)

    static_x = x.clone()
    step(static_x)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(static_x)
    fresh = torch.randn_like(x)
    static_x.copy_(fresh)
    graph.replay()
    eager = step(fresh)
    torch.cuda.synchronize()
    for got, want in zip(captured, eager):
        assert torch.equal(got, want)


@pytest.mark.skipif(not lk.cuda_ext_available(), reason="lora_kernels._C is not built")
@pytest.mark.parametrize("M", [9, 12, 16])
def test_cuda_9_to_16_rows_eager_and_captured(M):
    """Eager calls take the 16-row decode form, a CUDA-graph capture the composite (csrc/cuda/decode.cu); both
    meet the float64 reference within bf16 rounding, and the captured graph replays with new inputs."""
    torch.manual_seed(M)
    x, w, a, b, bias = make_inputs(M, 4096, 1000, 16, torch.bfloat16, device="cuda")
    ref = (x.double() @ w.double().t() + 0.5 * (x.double() @ a.double().t()) @ b.double().t() + bias.double())
    eager = lk.lora_linear(x, w, a, b, 0.5, bias, backend="cuda")
    static_x = x.clone()
    lk.lora_linear(static_x, w, a, b, 0.5, bias, backend="cuda")  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = lk.lora_linear(static_x, w, a, b, 0.5, bias, backend="cuda")
    static_x.copy_(x)
    graph.replay()
    torch.cuda.synchronize()
    scale = ref.abs().max().item()
    for y in (eager, captured):
        assert (y.double() - ref).abs().max().item() <= 2e-2 * scale


@pytest.mark.skipif(not lk.triton_available(), reason="needs triton")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_auto_forward_through_a_merged_weight_meets_the_oracle_rule(monkeypatch, dtype, bias):
    """`auto` with nothing to differentiate and no dropout, where the bytes say so and the GEMM is large enough,
    runs y = x·(W + s·B·A)ᵀ (auto_linear.merged_linear): the oracle rule on y; a problem under the size floor,
    a call that needs gradients, one with dropout, one with the path turned off (LORA_KERNELS_MERGED_WEIGHT=0)
    and one with a backend forced through LORA_KERNELS_AUTO take the usual paths."""
    from helpers import count_calls
    from lora_kernels import auto_linear, reference
    x, w, a, b, bb = make_inputs(3000, 264, 136, 8, dtype, device="cuda", bias=bias,
                                 adapter_dtype=torch.float32)
    calls = count_calls(monkeypatch, auto_linear, "merged_linear")
    with torch.no_grad():  # below the size floor (MERGED_MIN_MNK: host time would outweigh the bytes saved)
        lk.lora_linear(x[:-1], w, a, b, 0.75, bb)  # (a shape of its own: the resolved-call cache keys on it)
    assert not calls
    monkeypatch.setattr(auto_linear, "MERGED_MIN_MNK", 0)  # a small problem stands in for a large one
    exact = reference.lora_linear(x.double(), w.double(), a.double(), b.double(), 0.75,
                                  bb.double() if bias else None)
    plain = reference.lora_linear(x, w, a.to(dtype), b.to(dtype), 0.75, bb)
    with torch.no_grad():
        y = lk.lora_linear(x, w, a, b, 0.75, bb)
    assert len(calls) == 1
    assert (y.double() - exact).norm() <= 2 * (plain.double() - exact).norm() + 1e-6 * exact.norm()
    lk.lora_linear(x, w, a.requires_grad_(), b, 0.75, bb)
    with torch.no_grad():
        lk.lora_linear(x, w, a, b, 0.75, bb, dropout_p=0.1)
        monkeypatch.setenv("LORA_KERNELS_MERGED_WEIGHT", "0")
        lk.lora_linear(x, w, a, b, 0.75, bb)
        monkeypatch.delenv("LORA_KERNELS_MERGED_WEIGHT")
        monkeypatch.setenv("LORA_KERNELS_AUTO", "cuda" if lk.cuda_ext_available() else "triton")
        lk.lora_linear(x, w, a, b, 0.75, bb)
    assert len(calls) == 1
