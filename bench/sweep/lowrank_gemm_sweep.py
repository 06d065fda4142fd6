"""Tile / cluster / schedule variants of the one-GEMM kernel against cuBLAS and the cuBLAS pair (bf16, r = 16,
do_bench medians, one process). Build once (minutes; CUTLASS headers from the nvidia-cutlass wheel), then time:

    python3 bench/sweep/lowrank_gemm_sweep.py --build DIR     # writes DIR/lowrank_sweep*.so
    python3 bench/sweep/lowrank_gemm_sweep.py --so DIR/lowrank_sweep*.so
"""
import argparse
import importlib.util
import os

import torch


def build(out_dir):
    from torch.utils.cpp_extension import load
    import cutlass_library
    root = os.path.dirname(os.path.abspath(__file__))
    csrc = os.path.join(root, "..", "..", "csrc")
    cutlass = os.path.join(os.path.dirname(cutlass_library.__file__), "source")
    includes = [csrc, os.path.join(cutlass, "include"), os.path.join(cutlass, "tools", "util", "include")]
    try:  # CUDA's headers from the nvidia wheels where the toolkit lacks some (cusparse.h)
        import nvidia
        includes += [os.path.join(d, "cu13", "include") for d in nvidia.__path__
                     if os.path.isdir(os.path.join(d, "cu13", "include"))]
    except ImportError:
        pass
    os.makedirs(out_dir, exist_ok=True)
    load("lowrank_sweep", [os.path.join(root, "lowrank_gemm_sweep.cu")], build_directory=out_dir,
         extra_include_paths=includes,
         extra_cuda_cflags=["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-DLORA_KERNELS_WITH_CUDA",
                            "-DLORA_KERNELS_WITH_CUTLASS", "-gencode=arch=compute_90a,code=sm_90a"],
         verbose=False)


def load_so(path):
    spec = importlib.util.spec_from_file_location("lowrank_sweep", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--build")
    p.add_argument("--so")
    args = p.parse_args()
    if args.build:
        build(args.build)
        return
    from triton.testing import do_bench
    mod = load_so(args.so)
    names = mod.names()
    print(torch.cuda.get_device_name(), flush=True)
    r, dt = 16, torch.bfloat16
    torch.manual_seed(0)
    for M, K, N in [(8192, 4096, 4096), (8192, 4096, 14336), (2048, 4096, 4096), (512, 4096, 4096),
                    (4096, 2048, 5632), (4096, 2048, 256), (256, 4096, 4096), (64, 4096, 4096)]:
        x = torch.randn(M, K, device="cuda", dtype=dt)
        w = (torch.randn(N, K, device="cuda") / K**0.5).to(dt)
        a = (torch.randn(r, K, device="cuda") / K**0.5).to(dt)
        b = (torch.randn(N, r, device="cuda") / r**0.5).to(dt)
        u, v = x @ a.t(), (2.0 * b).to(dt)
        exact = x.double() @ w.double().t() + u.double() @ v.double().t()
        base = do_bench(lambda: x @ w.t(), warmup=25, rep=200) * 1e3

        def pair():
            return torch.mm(u, v.t()).addmm_(x, w.t())
        t_pair = do_bench(pair, warmup=25, rep=200) * 1e3
        line = f"{M}x{K}x{N}: cuBLAS {base:.1f} us, pair (u·vᵀ then beta=1) {t_pair / base:.3f}x"
        for i, name in enumerate(names):
            err = (mod.sweep_gemm(i, x, w, u, v).double() - exact).norm() / exact.norm()
            t = do_bench(lambda: mod.sweep_gemm(i, x, w, u, v), warmup=25, rep=200) * 1e3
            line += f" | {name} {t:.1f} us {t / base:.3f}x (rel err {err:.1e})"
        print(line, flush=True)


if __name__ == "__main__":
    main()
