"""The compiled C++ ops (lora_kernels._C) on the CPU, and the CMake build with its C++ example."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import lora_kernels as lk
from lora_kernels import reference
from helpers import make_inputs

needs_ext = pytest.mark.skipif(not lk.cuda_ext_available(), reason="lora_kernels._C is not built here")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rule(name, got, composite, exact):
    err = (got.double() - exact).norm().item()
    tol = 2 * (composite.double() - exact).norm().item() + 1e-6 * max(exact.numel() ** 0.5, exact.norm().item())
    assert err <= tol, f"{name}: error {err:.3e} > {tol:.3e}"


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_merge_matches_reference_bit_for_bit(dtype):
    w = torch.randn(33, 70).to(dtype)
    a, b = torch.randn(5, 70) / 8, torch.randn(33, 5)
    for unmerge in (False, True):
        mine, ref = w.clone(), w.clone()
        torch.ops.lora_kernels.merge_weight_(mine, a, b, 0.7, unmerge)
        reference.merge_(ref, a, b, 0.7, unmerge=unmerge)
        assert torch.equal(mine.view(torch.uint8), ref.view(torch.uint8))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 33, 17, 1), (19, 70, 45, 8)])
def test_cpu_linear_ops_oracle(dtype, shape):
    M, K, N, r = shape
    x, w, a, b, bias = make_inputs(M, K, N, r, dtype, adapter_dtype=torch.float32)
    y, xa = torch.ops.lora_kernels.linear_forward(x, w, a, b, bias, 0.5)
    y_c, xa_c = reference.lora_forward(x, w, a, b, bias, 0.5, None, 0.0, None)
    f64 = [t.double() for t in (x, w, a, b, bias)]
    y_e, xa_e = reference.lora_forward(*f64, 0.5, None, 0.0, None)
    _rule("y", y, y_c, y_e)
    dy = torch.randn(M, N, dtype=torch.float64)
    got = torch.ops.lora_kernels.linear_backward(dy.to(dtype), x, w, a, b, xa, 0.5, True, True)
    comp = reference.lora_backward(dy.to(dtype), x, w, a, b, xa_c, 0.5, None, 0.0, None, True, True)
    exact = reference.lora_backward(dy, f64[0], f64[1], f64[2], f64[3], xa_e, 0.5, None, 0.0, None, True, True)
    for name, g, c, e in zip(("dx", "dA", "dB", "dbias"), got, comp, exact):
        _rule(name, g, c, e)
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.float32


_ERROR_PROBE = """
import sys, torch, lora_kernels._C
dev = sys.argv[1]
w, a, b = torch.randn(8, 16, device=dev), torch.randn(2, 16, device=dev), torch.randn(8, 3, device=dev)
for call, name in ((lambda: torch.ops.lora_kernels.merge_weight_(w, a, b, 1.0, False), "lora_B"),
                   (lambda: torch.ops.lora_kernels.linear_forward(torch.randn(3, 15, device=dev), w, a,
                                                                  torch.randn(8, 2, device=dev), None, 1.0), "x")):
    try:
        call()
    except RuntimeError as e:
        assert name in str(e), str(e)
    else:
        raise SystemExit("no error raised")
print("raised")
"""


@needs_ext
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_cpp_errors_reach_python_and_name_the_argument(device):
    """A TORCH_CHECK inside the extension must arrive as a RuntimeError. In a child process: when the
    extension carried its own copy of the C++ runtime (setup.py, _loaded_libstdcxx) this crashed the process."""
    proc = subprocess.run([sys.executable, "-c", _ERROR_PROBE, device], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0 and "raised" in proc.stdout, (proc.returncode, proc.stderr[-2000:])


_THRESHOLD_PROBE = """
import torch, lora_kernels._C
x, w, a, b = torch.randn(4, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
y, _ = torch.ops.lora_kernels.linear_forward(x, w, a, b, None, 1.0)
assert torch.allclose(y, x @ w.t() + (x @ a.t()) @ b.t(), atol=1e-5)
print("ran")
"""


@needs_ext
@pytest.mark.parametrize("value, accepted", [("64", True), ("abc", False), ("0", False), ("12rows", False)])
def test_row_threshold_setting_is_checked(value, accepted):
    """LORA_KERNELS_CUTLASS_MIN_ROWS (the one-GEMM kernel's row threshold, read once per process): a positive
    integer is taken; anything else is an error that names the setting, not a silent default."""
    if not hasattr(torch.ops.lora_kernels, "lowrank_gemm"):
        pytest.skip("built without the one-GEMM kernel: the setting is not read")
    _check_setting(_THRESHOLD_PROBE, "LORA_KERNELS_CUTLASS_MIN_ROWS", value, accepted, "expected an integer from 1")


def _check_setting(probe, name, value, accepted, message):
    """Runs probe in a child process with the setting name=value (each is read once per process): it must
    run, or fail with an error that names the setting."""
    env = {**os.environ, name: value}
    env.pop("LORA_KERNELS_CUTLASS_CONFIG", None)  # a forced shape skips the pick, and the settings it reads
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=env)
    if accepted:
        assert proc.returncode == 0 and "ran" in proc.stdout, proc.stderr[-2000:]
    else:
        assert proc.returncode != 0 and f"{name}: {message}" in proc.stderr, proc.stderr[-2000:]


_GEMM_PROBE = """
import torch, lora_kernels._C
x, w = torch.randn(256, 64, device="cuda", dtype=torch.bfloat16), torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
u, b = torch.randn(256, 16, device="cuda", dtype=torch.bfloat16), torch.randn(64, 16, device="cuda", dtype=torch.bfloat16)
torch.ops.lora_kernels.lowrank_gemm(x, w, u, b, None, 1.0, True, -1)
print("ran")
"""


@needs_ext
@pytest.mark.gpu
@pytest.mark.parametrize("name, value, accepted, message", [
    ("LORA_KERNELS_CUTLASS_STREAMK", "0", True, ""), ("LORA_KERNELS_CUTLASS_STREAMK", "1", True, ""),
    ("LORA_KERNELS_CUTLASS_STREAMK", "2", False, "expected an integer from 0 to 1"),
    ("LORA_KERNELS_CUTLASS_STREAMK", "on", False, "expected an integer from 0 to 1"),
    ("LORA_KERNELS_CUTLASS_RASTER", "1", True, ""), ("LORA_KERNELS_CUTLASS_RASTER", "2", True, ""),
    ("LORA_KERNELS_CUTLASS_RASTER", "-1", False, "expected an integer from 0 to 2"),
    ("LORA_KERNELS_CUTLASS_SWIZZLE", "8", True, ""),
    ("LORA_KERNELS_CUTLASS_SWIZZLE", "16", False, "expected an integer from 1 to 8")])
def test_one_gemm_settings_are_checked(name, value, accepted, message):
    """The one-GEMM kernel's A/B settings (each read once per process, by the first timed pick or launch):
    LORA_KERNELS_CUTLASS_STREAMK (0, the default, leaves the stream-K shape out of the timing; 1 adds it),
    _RASTER (the tile order) and _SWIZZLE; a value out of range is an error that names the setting."""
    if not torch.cuda.is_available() or not hasattr(torch.ops.lora_kernels, "lowrank_gemm"):
        pytest.skip("the settings are read by the one-GEMM kernel, on a GPU")
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the one-GEMM kernel runs on Hopper")
    _check_setting(_GEMM_PROBE, name, value, accepted, message)


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cmake_build_and_cpp_example(tmp_path):
    """Builds csrc/ as a libtorch library (CPU kernels; the CUDA ones compile in the extension build) and runs
    the C++ example, which checks the ops against ATen and exits non-zero on a mismatch."""
    proc = subprocess.run(["bash", os.path.join(ROOT, "csrc", "example", "build.sh"), str(tmp_path / "build"),
                           sys.executable, "-DLORA_KERNELS_CUDA=OFF"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "all checks passed" in proc.stdout


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_dropout_op_matches_reference_mask(dtype):
    x = torch.randn(37, 70).to(dtype)
    seed = torch.tensor(123456789)
    got = torch.ops.lora_kernels.dropout(x, seed, 0.3)
    assert torch.equal(got, reference.apply_dropout(x, 0.3, seed))


@needs_ext
def test_cpu_linear_ops_with_dropout_match_reference():
    x, w, a, b, bias = make_inputs(19, 70, 45, 8, torch.float32)
    seed = torch.tensor(42)
    y, xa = torch.ops.lora_kernels.linear_forward(x, w, a, b, bias, 0.5, 0.2, seed)
    y_r, xa_r = reference.lora_forward(x, w, a, b, bias, 0.5, None, 0.2, seed)
    torch.testing.assert_close(y, y_r, rtol=1e-5, atol=1e-5)
    dy = torch.randn(19, 45)
    got = torch.ops.lora_kernels.linear_backward(dy, x, w, a, b, xa, 0.5, True, True, 0.2, seed)
    ref = reference.lora_backward(dy, x, w, a, b, xa_r, 0.5, None, 0.2, seed, True, True)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def _cpp_lora_linear(x, w, a, b, bias, scaling=0.5, p=0.0):
    return torch.ops.lora_kernels.lora_linear(x, w, a, b, bias, scaling, p)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["2d", "3d", "noncontig"])
@pytest.mark.parametrize("bias", [True, False])
def test_cpp_autograd_op_oracle(dtype, layout, bias):
    """The eager C++ path (forward and backward in C++) under the oracle rule, gradients through autograd."""
    from helpers import _run
    M, K, N, r = 7, 70, 45, 8
    x, w, a, b, bb = make_inputs(M, K, N, r, dtype, adapter_dtype=torch.float32, bias=bias,
                                 x_3d=layout == "3d", noncontig=layout == "noncontig")
    dy = torch.randn(*x.shape[:-1], N, dtype=torch.float64)
    got = _run(_cpp_lora_linear, x, w, a, b, bb, dy)
    def composite(xx, ww, aa, bb_, bias_):
        return reference.lora_linear(xx, ww, aa, bb_, 0.5, bias_)

    comp = _run(composite, x, w, a, b, bb, dy)
    exact = _run(composite, x, w, a, b, bb, dy, upcast=torch.float64)
    assert got[0].shape == x.shape[:-1] + (N,) and got[1].shape == x.shape
    for name, g, c, e in zip(("y", "dx", "dA", "dB", "dbias"), got, comp, exact):
        _rule(name, g, c, e)
    assert got[2].dtype == torch.float32 and got[3].dtype == torch.float32


@needs_ext
def test_cpp_autograd_op_dropout_same_seed_and_mask_as_python_path():
    """Same generator draw as ops.draw_seed: the C++ path and the Python custom ops drop the same elements."""
    x, w, a, b, bias = make_inputs(19, 70, 45, 8, torch.float32)
    dy = torch.randn(19, 45)
    outs = []
    for fn in (lambda *t: _cpp_lora_linear(*t, 0.5, 0.3),
               lambda *t: lk.ops.lora_fwd(*t[:4], t[4], 0.5, None, 0.3, lk.ops.draw_seed(t[0]), "cuda", False)[0]):
        torch.manual_seed(7)
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, a, b, bias)]
        y = fn(leaves[0], w, leaves[1], leaves[2], leaves[3])
        y.backward(dy)
        outs.append([y.detach()] + [t.grad for t in leaves])
    for g, r in zip(*outs):
        assert torch.equal(g, r)


@needs_ext
def test_cpp_autograd_op_no_grad_inference_and_frozen_adapters():
    x, w, a, b, bias = make_inputs(5, 24, 12, 4, torch.float32)
    want = reference.lora_linear(x, w, a, b, 0.5, bias)
    with torch.no_grad():
        torch.testing.assert_close(_cpp_lora_linear(x, w, a, b, bias), want)
    with torch.inference_mode():
        torch.testing.assert_close(_cpp_lora_linear(x, w, a, b, bias), want)
    xg = x.clone().requires_grad_(True)           # adapters frozen: only dx
    _cpp_lora_linear(xg, w, a, b, bias).sum().backward()
    assert xg.grad is not None and a.grad is None and b.grad is None
    # nothing to differentiate under no_grad: the forward runs alone, with the bits (and the dropout seed
    # drawn from the generator) of the differentiable call
    ag = a.clone().requires_grad_(True)
    torch.manual_seed(3)
    y_grad = torch.ops.lora_kernels.lora_linear(xg, w, ag, b, bias, 0.5, 0.3)
    torch.manual_seed(3)
    with torch.no_grad():
        y_free = torch.ops.lora_kernels.lora_linear(xg, w, ag, b, bias, 0.5, 0.3)
    assert y_grad.grad_fn is not None and y_free.grad_fn is None and torch.equal(y_grad, y_free)


@needs_ext
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("dtypes", [(torch.float32, None), (torch.bfloat16, torch.float32)])
def test_cpp_ops_as_graph_nodes_compile_and_match_eager(p, dtypes):
    """Under torch.compile the cuda backend puts the C++ ops in the graph (fake and autograd rules from
    _cuda_backend); on CPU tensors their CPU kernels run. Compiled equals the eager C++ autograd op bit for
    bit, gradients too (float32 adapters of bfloat16 x: the backward reads the forward's casts, as the eager
    op's does), and two layers on one input draw two seeds (the seed op is never merged)."""
    from lora_kernels import _backends
    cb = _backends.cuda_backend()
    x, w, a, b, bias = make_inputs(19, 70, 45, 8, dtypes[0], adapter_dtype=dtypes[1])
    a2, b2 = a.flip(0).contiguous(), b.flip(1).contiguous()

    def two_layers(fn, xx, aa, bb):
        return fn(xx, w, aa, bb, bias, 0.5, p) + fn(xx, w, a2, b2, None, 0.25, p)

    outs = []
    for fn in (_cpp_lora_linear, torch.compile(lambda *t: two_layers(cb.graph_linear, *t),
                                                backend="aot_eager_decomp_partition",
                                                fullgraph=True)):
        torch.manual_seed(11)
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, a, b)]
        y = two_layers(_cpp_lora_linear, *leaves) if fn is _cpp_lora_linear else fn(*leaves)
        y.sum().backward()
        outs.append([y.detach()] + [t.grad for t in leaves])
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@needs_ext
def test_cpp_linear_forward_opcheck():
    import lora_kernels._cuda_backend  # noqa: F401 - registers the fake and autograd rules
    x, w, a, b, bias = make_inputs(9, 24, 12, 4, torch.float32)
    a.requires_grad_(True)
    torch.library.opcheck(torch.ops.lora_kernels.linear_forward.default, (x, w, a, b, bias, 0.5, 0.0, None))


@needs_ext
@pytest.mark.parametrize("adapter_dtype", [None, torch.float32])
def test_cpp_linear_forward_saved_opcheck_and_pieces(adapter_dtype):
    """The graph's forward returns x·Aᵀ in x's dtype and the adapters' casts only where their dtype differs
    (0-element tensors otherwise: no output aliases an input); its backward gives linear_backward's bits."""
    import lora_kernels._cuda_backend  # noqa: F401 - registers the fake and autograd rules
    x, w, a, b, bias = make_inputs(9, 24, 12, 4, torch.bfloat16, adapter_dtype=adapter_dtype)
    a.requires_grad_(True)
    ops = torch.ops.lora_kernels
    torch.library.opcheck(ops.linear_forward_saved.default, (x, w, a, b, bias, 0.5, 0.0, None))
    y, xa, a_cast, b_cast = ops.linear_forward_saved(x, w, a, b, bias, 0.5)
    y_ref, xa_ref = ops.linear_forward(x, w, a, b, bias, 0.5)
    assert torch.equal(y, y_ref) and xa.dtype == x.dtype and torch.equal(xa, xa_ref.to(x.dtype))
    casts = adapter_dtype is not None
    assert (a_cast.shape, b_cast.shape) == ((a.shape, b.shape) if casts else ((0,), (0,)))
    if casts:
        assert torch.equal(a_cast, a.detach().to(x.dtype)) and torch.equal(b_cast, b.to(x.dtype))
    dy = torch.randn_like(y)
    A, B = (a_cast, b_cast) if casts else (a.detach(), b)
    got = ops.linear_backward_saved(dy, x, w, A, B, xa, 0.5, True, True, 0.0, None, a.dtype, b.dtype)
    want = ops.linear_backward(dy, x, w, a.detach(), b, xa_ref, 0.5, True, True)
    for g, r in zip(got, want):
        assert g.dtype == r.dtype and torch.equal(g, r)


@needs_ext
def test_no_ext_variable_leaves_a_built_extension_unused(monkeypatch):
    """LORA_KERNELS_NO_EXT=1 at run time: the extension is not used even where it is built, so one machine can
    measure the Triton-only install beside the full one."""
    from lora_kernels import _backends
    monkeypatch.setenv("LORA_KERNELS_NO_EXT", "1")
    assert not _backends.cuda_ext_available()
    monkeypatch.delenv("LORA_KERNELS_NO_EXT")
    assert _backends.cuda_ext_available()
