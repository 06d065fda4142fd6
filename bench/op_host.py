"""Host time to queue one call of the extension's ops, per TinyLlama layer shape (4096 rows, bf16 x, float32
adapters as peft keeps them, dropout 0.05): the graph path's forward and backward ops (what a compiled step
calls) and the eager C++ op's forward + backward. The GPU is held by a sleep kernel while the calls are
queued, so what is timed is the host's work alone (dispatch, checks, GEMM setup, launches). Best of 5 runs of
30 calls; run it with nothing else on the host (tests on another GPU share its cores and double the figures).

python3 bench/op_host.py"""
import time

import torch

import lora_kernels as lk

SHAPES = [(4096, 2048, 2048), (4096, 2048, 256), (4096, 2048, 5632), (4096, 5632, 2048)]


def host_us(fn, calls=30, runs=5):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(runs):
        torch.cuda._sleep(int(1e9))  # ~0.5 s of GPU time: every call below only queues
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return best


def main():
    assert lk.cuda_ext_available(), "the CUDA extension is not built"
    import lora_kernels._cuda_backend  # noqa: F401 - the graph ops' fake and autograd rules
    ops = torch.ops.lora_kernels
    print(f"{torch.cuda.get_device_name()}: host us per call queued behind a sleeping GPU (best of 5 x 30 calls)")
    for M, K, N in SHAPES:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5
        a = (torch.randn(16, K, device="cuda") / K**0.5).requires_grad_()
        b = (torch.randn(N, 16, device="cuda") * 0.02).requires_grad_()
        dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
        seed = torch.tensor(1234, device="cuda")
        y, xa, a_cast, b_cast = ops.linear_forward_saved(x, w, a.detach(), b.detach(), None, 2.0, 0.05, seed)
        fwd = host_us(lambda: ops.linear_forward_saved(x, w, a.detach(), b.detach(), None, 2.0, 0.05, seed))
        bwd = host_us(lambda: ops.linear_backward_saved(dy, x, w, a_cast, b_cast, xa, 2.0, True, False, 0.05, seed,
                                                        torch.float32, torch.float32))
        xg = x.clone().requires_grad_()

        def eager():
            ops.lora_linear(xg, w, a, b, None, 2.0, 0.05).backward(dy)
            xg.grad = a.grad = b.grad = None
        print(f"  {M}x{K}->{N}: graph forward {fwd:6.1f}, graph backward {bwd:6.1f}, eager op fwd+bwd "
              f"{host_us(eager):6.1f}", flush=True)


if __name__ == "__main__":
    main()
