"""GPU checks of the one-GEMM LoRA kernel (csrc/cuda/lowrank_gemm.cu, Hopper): the op itself against float64,
and the CUDA backend's forward and backward that take it, under the oracle rule."""
import os

import pytest
import torch

import lora_kernels as lk
from lora_kernels import reference
from helpers import make_inputs, oracle_check

pytestmark = pytest.mark.gpu


def _has_kernel():
    if not (lk.cuda_ext_available() and torch.cuda.is_available()):
        return False
    return hasattr(torch.ops.lora_kernels, "lowrank_gemm") and torch.cuda.get_device_capability()[0] == 9


needs_kernel = pytest.mark.skipif(not _has_kernel(), reason="needs the CUTLASS kernel (built with it, sm_90)")


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weight_kmajor", [True, False])
@pytest.mark.parametrize("M, K, N, r, bias", [(1, 64, 8, 8, True), (37, 136, 200, 16, False),
                                              (255, 512, 1000, 24, True), (1000, 4096, 4104, 32, False),
                                              (4096, 2048, 5632, 16, True), (130, 8, 264, 8, False)])
def test_lowrank_gemm_meets_the_oracle_rule(dtype, weight_kmajor, M, K, N, r, bias):
    g = torch.Generator(device="cuda").manual_seed(M * 7 + N)
    a = torch.randn(M, K, device="cuda", dtype=dtype, generator=g)
    w = torch.randn(N, K, device="cuda", dtype=dtype, generator=g) / K**0.5
    u = torch.randn(M, r, device="cuda", dtype=dtype, generator=g)
    b = torch.randn(N, r, device="cuda", dtype=dtype, generator=g) / r**0.5
    bvec = torch.randn(N, device="cuda", dtype=dtype, generator=g) if bias else None
    s = 0.75
    if not weight_kmajor:  # the backward's form: a·W with W stored (K, N)
        w = w.t().contiguous()
    got = torch.ops.lora_kernels.lowrank_gemm(a, w, u, b, bvec, s, weight_kmajor)
    wt = w.t() if weight_kmajor else w
    torch_y = a @ wt + s * (u @ b.t()) + (bvec if bias else 0)
    exact = a.double() @ wt.double() + s * (u.double() @ b.double().t()) + (bvec.double() if bias else 0)
    assert got.dtype == dtype and got.shape == (M, N)
    assert not torch.isnan(got).any()
    err = (got.double() - exact).norm().item()
    tol = 2 * (torch_y.double() - exact).norm().item() + 1e-6 * max(exact.numel() ** 0.5, exact.norm().item())
    assert err <= tol, f"error {err:.3e} > 2x torch's {tol:.3e}"


@needs_kernel
@pytest.mark.parametrize("M, K, N, r", [(37, 136, 200, 16), (1000, 512, 4104, 32), (4096, 2048, 1024, 8)])
def test_lowrank_gemm_masked_term_meets_the_oracle_rule(M, K, N, r):
    # the backward's dx form: a·W with W stored (K, N), the rank-r term under dropout's mask and 1/(1-p)
    dtype, s, p = torch.bfloat16, 0.5, 0.1
    g = torch.Generator(device="cuda").manual_seed(M + N)
    a = torch.randn(M, K, device="cuda", dtype=dtype, generator=g)
    w = torch.randn(K, N, device="cuda", dtype=dtype, generator=g) / K**0.5
    u = torch.randn(M, r, device="cuda", dtype=dtype, generator=g)
    b = torch.randn(N, r, device="cuda", dtype=dtype, generator=g) / r**0.5
    seed = torch.randint(0, 2**31 - 1, (), device="cuda", dtype=torch.int64, generator=g)
    got = torch.ops.lora_kernels.lowrank_gemm(a, w, u, b, None, s, False, seed, p)
    torch_y = a @ w + s * reference.apply_dropout(u @ b.t(), p, seed)
    exact = a.double() @ w.double() + s * reference.apply_dropout(u.double() @ b.double().t(), p, seed)
    err = (got.double() - exact).norm().item()
    tol = 2 * (torch_y.double() - exact).norm().item() + 1e-6 * max(exact.numel() ** 0.5, exact.norm().item())
    assert err <= tol, f"error {err:.3e} > 2x torch's {tol:.3e}"
    unmasked = torch.ops.lora_kernels.lowrank_gemm(a, w, u, b, None, s, False)
    assert not torch.equal(got, unmasked)  # the mask is applied


@needs_kernel
@pytest.mark.skipif(os.environ.get("LORA_KERNELS_CUTLASS") != "1", reason="the backend takes the kernel with "
                    "LORA_KERNELS_CUTLASS=1 (read once per process)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M, K, N, r", [(333, 1024, 4096, 16), (4096, 2048, 5632, 8), (64, 4096, 4096, 32)])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_cuda_backend_through_the_one_gemm_kernel(dtype, M, K, N, r, p):
    # y and dx both from the kernel, at p = 0 and with dropout's mask on dx's rank-r term
    oracle_check(*make_inputs(M, K, N, r, dtype, device="cuda", bias=M % 2 == 1), dropout_p=p, backend="cuda")


@needs_kernel
def test_lowrank_gemm_rejects_what_it_cannot_take():
    a = torch.randn(16, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(32, 12, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="unsupported"):  # rank 12: not a multiple of 8
        torch.ops.lora_kernels.lowrank_gemm(a, w, torch.randn(16, 12, device="cuda", dtype=torch.bfloat16), b,
                                            None, 1.0, True)
    with pytest.raises(RuntimeError, match="unsupported"):  # float32
        torch.ops.lora_kernels.lowrank_gemm(a.float(), w.float(), torch.randn(16, 16, device="cuda"),
                                            torch.randn(32, 16, device="cuda"), None, 1.0, True)
