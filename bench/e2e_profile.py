"""Where a LoRA fine-tune step spends its time, on a GPU: host (wall) vs GPU kernel time.

1. Per layer at the TinyLlama shapes (4096 rows; K -> N of 2048 -> 2048, 2048 -> 256, 2048 -> 5632,
   5632 -> 2048), forward + backward with dropout 0.05 (--dropout): wall time per call issued back to back (host-bound
   when it exceeds the GPU time) and GPU kernel time per call from the profiler, for peft's layer and the
   patched layer on each backend.
2. One whole training step of the e2e model per provider under torch.profiler: wall, GPU-busy time,
   kernel launches, and the top kernels and host ops.

python3 bench/e2e_profile.py [--layers-only | --no-layers] [--steps VARIANT ...] [--out DIR]"""
import argparse
import os
import statistics
import time

import torch

import lora_kernels as lk

SHAPES = [(4096, 2048, 2048), (4096, 2048, 256), (4096, 2048, 5632), (4096, 5632, 2048)]


def _peft_layer(K, N, backend, dropout=0.05):
    import peft
    net = torch.nn.Sequential()
    net.add_module("proj", torch.nn.Linear(K, N, bias=False))
    net = net.to("cuda", torch.bfloat16)
    config = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules=["proj"])
    model = peft.get_peft_model(net, config)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    if backend is not None:
        lk.patch(model, backend=backend)
    return model.train()


def _gpu_us_per_call(fn, calls=20, kernels=None):
    """GPU µs per call; with a list `kernels`, (µs per call, name) of every kernel is appended to it."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    if kernels is not None:
        kernels += sorted(((e.self_device_time_total / calls, e.key) for e in events), reverse=True)
    return sum(e.self_device_time_total for e in events) / calls


def _wall_us_per_call(fn, calls=50):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        runs.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(runs)


def layers(log, show_kernels=False, only=None, dropout=0.05):
    log(f"per layer, fwd+bwd, bf16, r=16, dropout {dropout}: wall us per call back to back / GPU us per call")
    providers = [("peft", None), ("patched cuda", "cuda"), ("patched triton", "triton")]
    providers = [(n, b) for n, b in providers if (b != "cuda" or lk.cuda_ext_available()) and
                 (not only or (b or "peft") in only)]
    for M, K, N in SHAPES:
        x = torch.randn(1, M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(1, M, N, device="cuda", dtype=torch.bfloat16)
        cells = []
        for name, backend in providers:
            model = _peft_layer(K, N, backend, dropout)

            def step():
                model(x).backward(dy)
            kernels = [] if show_kernels else None
            wall, gpu = _wall_us_per_call(step), _gpu_us_per_call(step, kernels=kernels)
            cells.append(f"{name} {wall:7.1f} / {gpu:6.1f}")
            for us, kernel in kernels or ():
                log(f"    {name} {M}x{K}->{N}: {us:7.2f} us  {kernel[:110]}")
        log(f"  {M}x{K}->{N}: " + " | ".join(cells))


def whole_step(log, out, variants):
    from torch.profiler import ProfilerActivity, profile

    from lora_kernels.bench import e2e
    for name in [v[0] for v in e2e.VARIANTS if v[0] in variants]:
        fwd, opt, data = e2e.warmed([name])[name]  # one at a time: each is freed before the next is built
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            e2e._step(fwd, opt, data[3])
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) * 1e3
        ka = prof.key_averages()
        kernels = [e for e in ka if e.device_type.name == "CUDA"]
        gpu_ms = sum(e.self_device_time_total for e in kernels) / 1e3
        launches = sum(e.count for e in kernels)
        log(f"  step {name}: wall {wall:.1f} ms (profiled), GPU kernel time {gpu_ms:.1f} ms, {launches} kernels")
        table = ka.table(sort_by="self_device_time_total", row_limit=18, max_name_column_width=60)
        host = ka.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60)
        with open(os.path.join(out, f"e2e-profile-{name}.txt"), "w") as f:
            f.write(f"wall {wall:.1f} ms, GPU kernel time {gpu_ms:.1f} ms, {launches} kernels\n\n{table}\n\n{host}\n")
        log(table[:3500])
        del fwd, opt, data
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers-only", action="store_true")
    ap.add_argument("--no-layers", action="store_true")
    ap.add_argument("--kernels", action="store_true", help="per layer shape, every kernel's GPU µs per call")
    ap.add_argument("--layer-providers", nargs="+", choices=["peft", "cuda", "triton"],
                    help="the per-layer part's providers (default: all three)")
    ap.add_argument("--dropout", type=float, default=0.05, help="the per-layer part's LoRA dropout")
    ap.add_argument("--steps", nargs="+", default=["peft", "patched"], help="e2e variants to profile one step of")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    lines = []

    def log(s):
        print(s, flush=True)
        lines.append(s)
    log(f"{torch.cuda.get_device_name()} torch {torch.__version__}, C++ extension {lk.cuda_ext_available()}")
    if not args.no_layers:
        layers(log, args.kernels, args.layer_providers, args.dropout)
    if not args.layers_only:
        whole_step(log, args.out, args.steps)
    with open(os.path.join(args.out, "e2e-profile.log"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
