"""An evaluation pass with unmerged adapters: the e2e bench's TinyLlama-shaped model (random init), peft's LoRA on
every target linear, `model.eval()` and `torch.no_grad()`, one forward over batch×seq tokens. Providers: peft,
the patched model (`auto`, which takes the merged-weight forward at these sizes), and the patched model with
that form turned off (LORA_KERNELS_MERGED_WEIGHT=0). They take turns over rounds; the median forward per
provider, its per-round range, and the patched logits' largest difference from peft's.

python3 bench/infer_forward.py [--batch 2 --seq 2048 --rounds 5 --reps 5]"""
import argparse
import os
import statistics
import time

import torch

from lora_kernels.bench import e2e

DEVICE = "cuda"  # a module constant so that a CPU dry run of the script's logic can swap it
CONFIG = None    # the e2e bench's TinyLlama shape; a dry run passes a smaller one


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _timed(fn, reps):
    _sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync()
    return (time.perf_counter() - t0) / reps * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--shape", nargs=3, type=int, metavar=("HIDDEN", "INTERMEDIATE", "LAYERS"),
                    help="a Llama of this width and depth instead of TinyLlama's (32 heads, 8 KV heads)")
    args = ap.parse_args()
    global CONFIG
    if args.shape:
        hidden, inter, layers = args.shape
        CONFIG = dict(e2e.TINYLLAMA, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=max(args.seq, 2048))
    ids = torch.randint(0, e2e.TINYLLAMA["vocab_size"], (args.batch, args.seq), device=DEVICE)
    models = {}
    for name, patched in (("peft", False), ("patched", True)):
        model, _, _ = e2e.build(patched=patched, compiled=False, config=CONFIG, device=DEVICE)
        for m in model.modules():  # trained-looking adapters: peft starts B at zero
            if hasattr(m, "lora_B"):
                for lin in m.lora_B.values():
                    torch.nn.init.normal_(lin.weight, std=0.02)
        models[name] = model.eval()
    models["patched"].load_state_dict(models["peft"].state_dict())

    def forward(name, merged=True):
        def run():
            os.environ["LORA_KERNELS_MERGED_WEIGHT"] = "" if merged else "0"
            with torch.no_grad():
                return models[name](ids).logits
        return run
    providers = {"peft": forward("peft"), "patched": forward("patched"),
                 "patched, merged form off": forward("patched", merged=False)}
    outs = {name: fn() for name, fn in providers.items()}  # warm-up (auto's choices, allocator)
    ref = outs["peft"].float()
    times = {name: [] for name in providers}
    for _ in range(args.rounds):
        for name, fn in providers.items():
            times[name].append(_timed(fn, args.reps))
    os.environ.pop("LORA_KERNELS_MERGED_WEIGHT", None)
    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE
    shape = "Llama " + "x".join(map(str, args.shape)) if args.shape else "TinyLlama shape"
    print(f"{gpu}: no-grad forward, {args.batch}x{args.seq} tokens, {shape}, r=16 "
          f"on {','.join(e2e.TARGETS)}, bf16; {args.rounds} rounds x {args.reps} calls")
    base = statistics.median(times["peft"])
    for name, ts in times.items():
        med = statistics.median(ts)
        diff = (outs[name].float() - ref).abs().max().item()
        print(f"{name:26s} {med:8.2f} ms  speed-up vs peft {base / med:5.3f} "
              f"(rounds {min(ts):.2f}-{max(ts):.2f} ms)  max |logits - peft's| {diff:.3e}")
    print(f"logits scale: max |peft| {ref.abs().max().item():.3e}")


if __name__ == "__main__":
    main()
