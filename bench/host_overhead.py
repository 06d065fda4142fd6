"""Host time per call of the op's Python and C++ layers, on tiny CPU tensors, so that the kernels cost
nothing: what a LoRA layer costs the host per training step, next to a plain x@Wᵀ and peft's own layer.

"cuda path" rows run the C++ ops' CPU kernels through exactly the calls the cuda backend makes on a GPU
(the backend choice is forced, since CPU tensors would otherwise get the reference).

python3 bench/host_overhead.py  -> microseconds per forward and per forward+backward, median of 5 runs.
python3 bench/host_overhead.py --triton-stub  -> the Triton backend's own Python per call at several row
    counts, with every Triton launch replaced by a no-op and the GPU queries answered as on an H200 (CPU only;
    tensor work on the small CPU tensors is still counted, so large M overstates it a little)."""
import statistics
import time

import torch

import lora_kernels as lk
from lora_kernels import _backends, ops


def _us(fn, n=300):
    for _ in range(20):
        fn()
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(runs)


def _peft_layer(K, N, r, dropout):
    import peft
    net = torch.nn.Sequential()
    net.add_module("proj", torch.nn.Linear(K, N, bias=False))
    model = peft.get_peft_model(net, peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout,
                                                     target_modules=["proj"]))
    model.train()
    return model


def main():
    torch.manual_seed(0)
    M, K, N, r = 4, 64, 64, 8
    x = torch.randn(M, K, requires_grad=True)
    w = torch.randn(N, K)
    a, b = torch.randn(r, K, requires_grad=True), torch.randn(N, r, requires_grad=True)
    dy = torch.randn(M, N)

    def step(backend="torch", p=0.0):
        return lambda: lk.lora_linear(x, w, a, b, 2.0, backend=backend, dropout_p=p).backward(dy)

    def fwd():
        with torch.no_grad():
            lk.lora_linear(x, w, a, b, 2.0, backend="torch")

    rows = [("x@Wt fwd+bwd (torch, for scale)", _us(lambda: (x @ w.t()).backward(dy))),
            ("lora_linear fwd, eager path", _us(fwd)), ("lora_linear fwd+bwd, eager path", _us(step())),
            ("lora_linear fwd+bwd, eager path, dropout 0.05", _us(step(p=0.05)))]
    wm = w.clone()
    rows += [("merge_ (torch), eager path", _us(lambda: lk.merge_(wm, a.detach(), b.detach(), 0.5, backend="torch"))),
             ("merge_ (torch), through the custom op", _us(lambda: ops.merge_op(wm, a.detach(), b.detach(), 0.5,
                                                                                False, "torch")))]
    eager = ops._eager
    ops._eager = lambda *t: False
    try:
        rows += [("lora_linear fwd, custom ops", _us(fwd)), ("lora_linear fwd+bwd, custom ops", _us(step()))]
    finally:
        ops._eager = eager
    resolve = _backends.resolve_linear
    have_ext = lk.cuda_ext_available()
    if have_ext:
        _backends.resolve_linear = lambda *args, **kw: "cuda"
        def fwd_cuda_path():
            with torch.no_grad():
                lk.lora_linear(x, w, a, b, 2.0, backend="auto")
        rows += [("lora_linear fwd, cuda path (C++ op, no_grad)", _us(fwd_cuda_path)),
                 ("lora_linear fwd+bwd, cuda path (C++ autograd)", _us(step("auto")))]
    try:
        import peft  # noqa: F401
        for p in (0.0, 0.05):
            model = _peft_layer(K, N, r, p)
            xin = x.detach().unsqueeze(0).requires_grad_(True)
            dyy = dy.unsqueeze(0)
            rows.append((f"peft LoRA layer fwd+bwd, dropout {p}", _us(lambda: model(xin).backward(dyy))))
            lk.patch(model)
            rows.append((f"patched peft layer fwd+bwd, dropout {p}", _us(lambda: model(xin).backward(dyy))))
    except ImportError:
        rows.append(("peft not installed", float("nan")))
    finally:
        _backends.resolve_linear = resolve
    print(f"torch {torch.__version__}, CPU tensors {M}x{K} -> {N}, r={r}, C++ extension: {have_ext}")
    for name, us in rows:
        print(f"{name:48s} {us:8.1f} us")


def triton_stub(K=256, N=256, r=16):
    """Host µs of the Triton path with the kernels stubbed (pointer feed: CPU tensors are not TMA-eligible)."""
    from triton.runtime import autotuner, jit

    from lora_kernels.triton import configs, measured

    def tuned(self, *args, **kwargs):
        self.best_config = self.configs[0]
    configs.interpreting = lambda: False
    jit.JITFunction.run = lambda self, *args, **kwargs: None
    autotuner.Autotuner.run = tuned
    configs._smem_limit = lambda: 232448
    configs.sm_count = lambda t: 132
    torch.cuda.is_current_stream_capturing = lambda: False
    torch.cuda.get_sync_debug_mode = lambda: 0
    torch.cuda.synchronize = lambda *args: None
    measured.gpu_ms = lambda fn, reps=20: (fn(), 1.0)[1]  # run once; the first path timed is kept
    _backends._require = lambda *args, **kwargs: None
    w = torch.randn(N, K, dtype=torch.bfloat16)
    a = torch.randn(r, K, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(N, r, dtype=torch.bfloat16, requires_grad=True)
    print(f"torch {torch.__version__}, Triton launches stubbed, bf16 CPU tensors M x {K} -> {N}, r={r}")
    for M in (1, 16, 64, 128, 2048):
        x = torch.randn(M, K, dtype=torch.bfloat16)
        xg, dy = x.clone().requires_grad_(), torch.randn(M, N, dtype=torch.bfloat16)

        def fwd():
            with torch.no_grad():
                lk.lora_linear(x, w, a, b, 2.0, backend="triton")
        step = lambda: lk.lora_linear(xg, w, a, b, 2.0, backend="triton").backward(dy)  # noqa: E731
        print(f"M={M:5d}: forward {_us(fwd):7.1f} us, forward+backward {_us(step, 100):7.1f} us")


if __name__ == "__main__":
    import sys
    triton_stub() if "--triton-stub" in sys.argv else main()
