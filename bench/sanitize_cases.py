"""Every GPU kernel once at odd shapes (M = 1, 3, 1000; K, N not multiples of 16), for compute-sanitizer:
    compute-sanitizer --tool memcheck python bench/sanitize_cases.py [triton|cuda ...]   (likewise racecheck,
    synccheck, initcheck); naming backends runs only theirs, so each can be its own (parallel) sanitized process.
Covers: fused linear forward / backward with and without dropout (Triton; CUDA: decode kernel, dropout and
adapter-cast kernel, dropout kernel), merge / unmerge, the multi-adapter and NF4 kernels (the extension's NF4
decode too), the split-K and TMA-fed GEMMs (forced)."""
import os
import sys

import torch

import lora_kernels as lk

dev = "cuda"
# Every path forced, section by section: no path choice is timed under the tools (each would run 20 calls of
# every candidate), and each kernel runs because a section asks for it.
os.environ.update(LORA_KERNELS_GEMM="pointers", LORA_KERNELS_DECODE="gemm")
backends = ["triton"] + (["cuda"] if lk.cuda_ext_available() else [])
if sys.argv[1:]:
    missing = set(sys.argv[1:]) - set(backends)
    if missing:
        raise SystemExit(f"backend(s) not available here: {sorted(missing)}")
    backends = sys.argv[1:]
for backend in backends:
    # M = 5, K = 136: the tensor-core decode (16-bit x; a partial 128-k step and 16-column tile)
    for M, K, N, r in ((1, 100, 70, 3), (3, 257, 129, 16), (5, 136, 100, 8), (1000, 200, 90, 33)):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for p, adapter_dtype in ((0.0, torch.float32), (0.1, torch.float32), (0.1, dtype)):
                x = torch.randn(M, K, device=dev, dtype=dtype, requires_grad=True)
                w = torch.randn(N, K, device=dev, dtype=dtype) / K**0.5
                a = (torch.randn(r, K, device=dev) / K**0.5).to(adapter_dtype).requires_grad_()
                b = torch.randn(N, r, device=dev).to(adapter_dtype).requires_grad_()
                bias = torch.randn(N, device=dev, dtype=dtype, requires_grad=True)
                y = lk.lora_linear(x, w, a, b, 0.5, bias, dropout_p=p, backend=backend)
                y.float().square().sum().backward()
            wm = w.clone()
            lk.merge_(wm, a.detach(), b.detach(), 0.5, backend=backend)
            lk.unmerge_(wm, a.detach(), b.detach(), 0.5, backend=backend)
    if backend == "triton":
        M, K, N, R, S = 77, 200, 90, 8, 5
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
        ids = torch.randint(-1, S, (M,), device=dev, dtype=torch.int32)
        lk.multi_lora_linear(x, w, torch.randn(S, R, K, device=dev), torch.randn(S, N, R, device=dev),
                             torch.rand(S, device=dev), ids, backend="triton")
        # the split-K few-rows forward, forced (dense and NF4 below), at odd N and K
        os.environ["LORA_KERNELS_DECODE"] = "splitk"
        for M in (1, 17):
            x = torch.randn(M, 200, device=dev, dtype=torch.bfloat16)
            lk.lora_linear(x, torch.randn(90, 200, device=dev, dtype=torch.bfloat16), torch.randn(8, 200, device=dev),
                           torch.randn(90, 8, device=dev), 0.5, torch.randn(90, device=dev, dtype=torch.bfloat16),
                           backend="triton")
        # the TMA-fed persistent GEMM (Hopper, >= 128 rows, 16-bit), forced, forward and dx, with and without
        # dropout and with float32 adapters (their own shared-memory term)
        os.environ["LORA_KERNELS_GEMM"] = "tma"
        for p, adapter_dtype in ((0.0, torch.float32), (0.1, torch.bfloat16)):
            x = torch.randn(300, 200, device=dev, dtype=torch.bfloat16, requires_grad=True)
            a = (torch.randn(33, 200, device=dev) / 14).to(adapter_dtype).requires_grad_()
            b = torch.randn(136, 33, device=dev).to(adapter_dtype).requires_grad_()
            lk.lora_linear(x, torch.randn(136, 200, device=dev, dtype=torch.bfloat16), a, b, 0.5, dropout_p=p,
                           backend="triton").float().sum().backward()
        os.environ["LORA_KERNELS_GEMM"] = "pointers"
        from lora_kernels.nf4 import quantize_nf4  # double-quantised absmax: its decode kernel too
        for M, decode in ((1, "splitk"), (37, "splitk"), (1, "gemv"), (3, "gemv")):
            os.environ["LORA_KERNELS_DECODE"] = decode  # gemv: the multiply-add partials (at most 4 rows)
            q = quantize_nf4(torch.randn(96, 192, device=dev, dtype=torch.bfloat16))
            x = torch.randn(M, 192, device=dev, dtype=torch.bfloat16, requires_grad=True)
            a = (torch.randn(8, 192, device=dev) / 14).requires_grad_()
            b = torch.randn(96, 8, device=dev).requires_grad_()
            for p in (0.0, 0.1):  # p = 0 takes the split-K forward
                lk.lora4_linear(x, q, a, b, 0.5, dropout_p=p, backend="triton").float().sum().backward()
        os.environ["LORA_KERNELS_DECODE"] = "gemm"
    if backend == "cuda":  # the extension's 4-bit decode: 1-8 rows, float32 and double-quantised absmaxes,
        from lora_kernels.nf4 import quantize_nf4  # 100 columns (a partial 16-column tile), K ending on half a step
        for M, double_quant in ((1, True), (3, False), (8, True)):
            q = quantize_nf4(torch.randn(100, 192, device=dev, dtype=torch.bfloat16), double_quant=double_quant)
            with torch.no_grad():
                lk.lora4_linear(torch.randn(M, 192, device=dev, dtype=torch.bfloat16), q,
                                torch.randn(8, 192, device=dev) / 14, torch.randn(100, 8, device=dev), 0.5,
                                torch.randn(100, device=dev, dtype=torch.bfloat16), backend="cuda")
torch.cuda.synchronize()
print("sanitize cases ran:", backends)
