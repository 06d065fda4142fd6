"""The TMA-fed persistent GEMM (lora_kernels/triton/tma_gemm.py): the oracle rule forward and backward when it is
forced, which shapes it takes, and that the others still get the pointer-fed kernel."""
import pytest
import torch

import lora_kernels as lk
from lora_kernels.triton import tma_gemm
from helpers import TRITON_DEVICES, count_calls, make_inputs, oracle_check

pytestmark = pytest.mark.skipif(not lk.triton_available(), reason="needs triton")
DEVICES = TRITON_DEVICES


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("M, K, N, r, dtype, adapter_fp32, bias, p", [
    (130, 96, 80, 8, torch.float16, True, True, 0.0),      # ragged M and N tiles, K tail zero-filled by TMA
    (256, 64, 48, 16, torch.float16, False, False, 0.3),   # dropout mask on the low-rank step (forward and dx)
    (200, 136, 40, 33, torch.float16, True, True, 0.0),    # rank padded 33 -> 64
    (512, 256, 384, 16, torch.bfloat16, True, True, 0.05),
])
def test_tma_gemm_meets_the_oracle_rule(monkeypatch, device, M, K, N, r, dtype, adapter_fp32, bias, p):
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the interpreter runs float32 / float16")
    if device == "cuda" and not tma_gemm.eligible(torch.empty(M, K, device=device, dtype=dtype),
                                                  torch.empty(N, K, device=device, dtype=dtype).t(),
                                                  torch.empty(M, N, device=device, dtype=dtype)):
        pytest.skip("TMA-fed GEMM is for Hopper")
    monkeypatch.setenv("LORA_KERNELS_GEMM", "tma")
    calls = count_calls(monkeypatch, tma_gemm, "launch")
    inputs = make_inputs(M, K, N, r, dtype, device=device, bias=bias,
                         adapter_dtype=torch.float32 if adapter_fp32 else None)
    oracle_check(*inputs, dropout_p=p, backend="triton", seed=M + K)
    assert len(calls) >= 2, "forward and dx did not both take the TMA-fed GEMM"


def test_shapes_it_takes_and_leaves():
    h = torch.float16
    x, w, y = torch.empty(256, 64, dtype=h), torch.empty(48, 64, dtype=h), torch.empty(256, 48, dtype=h)
    ok = tma_gemm.eligible
    interp = tma_gemm.configs.interpreting()
    assert tma_gemm.b_rows_are_n(w.t()) is True and tma_gemm.b_rows_are_n(w) is False
    assert tma_gemm.b_rows_are_n(torch.empty(48, 100, dtype=h).t()) is None    # 200-byte rows: no descriptor
    assert ok(x, w.t(), y) == interp                                      # CPU tensors: interpreter only
    assert not ok(x[:100], w.t(), y[:100])                                # too few rows
    assert not ok(x.float(), w.t().float(), y.float())                    # 16-bit operands only
    assert not ok(torch.empty(256, 100, dtype=h), torch.empty(48, 100, dtype=h).t(), y)


def test_tma_tiles_fit_with_float32_adapters():
    """peft's float32 adapters under bf16 activations at rank tile 64: Triton stages the adapter tiles at their
    own width too, so the first 128x256 tile (245,760 bytes on an H200) must not be launched as it is."""
    from lora_kernels.triton import configs
    limit = configs._smem_limit() / configs.SMEM_MARGIN
    fitted = configs.fit_stages(tma_gemm.CONFIGS, 2, 64, False, False, 4)
    assert fitted, "some tile fits"
    for c in fitted:
        assert configs.gemm_smem_bytes(c.kwargs, c.num_stages, 2, 64, False, False, 4) <= limit
    wide = configs.gemm_smem_bytes(tma_gemm.CONFIGS[0].kwargs, tma_gemm.CONFIGS[0].num_stages, 2, 64, False, False, 4)
    assert wide >= 245760 > limit
