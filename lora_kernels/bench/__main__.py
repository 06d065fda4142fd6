"""python -m lora_kernels.bench: every provider side by side in one run (GPU), or the CPU demo."""
from __future__ import annotations

import argparse
import logging
import os
import sys

import torch

from .providers import FORCED_FEEDS, PROVIDERS


def _progress(jobs):
    try:
        from tqdm import tqdm
        return tqdm(jobs, desc="bench", unit="case", file=sys.stderr)
    except ImportError:
        return jobs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lora_kernels.bench", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="a short run over fewer shapes and ranks")
    ap.add_argument("--modes", nargs="+", default=["forward", "train", "merge", "merge_model", "multi", "nf4"],
                    choices=["forward", "train", "merge", "merge_model", "multi", "nf4", "e2e"],
                    help="train = fwd+bwd with x needing grad, W frozen; multi = mixed-adapter batches; nf4 = 4-bit base; "
                         "e2e = a ~1B Llama fine-tune step (needs peft and transformers)")
    ap.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=list(PROVIDERS) + list(FORCED_FEEDS),
                    help="also, on request: triton_pointers, triton_tma (the Triton GEMM's feed forced)")
    ap.add_argument("--e2e-variants", nargs="+", default=None,
                    help="e2e providers (default: peft, peft_compile, patched, patched_triton, patched_compile; "
                         "also qlora_peft, qlora_patched: the target linears in bitsandbytes NF4); the first "
                         "named is the baseline of the speed-ups")
    ap.add_argument("--e2e-rounds", type=int, default=6, help="e2e interleaved rounds (each provider runs "
                    "--e2e-steps timed steps per round)")
    ap.add_argument("--e2e-steps", type=int, default=5, help="e2e timed steps per provider per round")
    ap.add_argument("--loss-steps", type=int, default=None, help="e2e loss-curve steps (default 50 with --quick, else 200)")
    ap.add_argument("--out", default="bench/results", help="folder for the .jsonl/.md/.png results")
    ap.add_argument("--cpu-demo", action="store_true", help="run the CPU demo even where a GPU is present")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.cpu_demo or not torch.cuda.is_available():
        # The Triton kernels run under the interpreter only where TRITON_INTERPRET was set before triton was
        # imported (as a program, _cpu_demo_process sees to that); elsewhere the demo checks the torch backend.
        from . import cpu_demo
        return 0 if cpu_demo.run() else 1

    from . import gpu, report
    rows, meta = gpu.run(args.quick, [m for m in args.modes if m in ("forward", "train", "merge")],
                         args.providers, log=print, progress=_progress)
    curves = None

    def extra_mode(name, fn):
        # One mode failing must not lose the figures of the others: say what broke and go on.
        try:
            return fn()
        except Exception as e:  # noqa: BLE001
            print(f"mode {name} failed: {type(e).__name__}: {str(e)[:300]}")
            return []
    if "merge_model" in args.modes:
        from . import merge_model_bench
        rows += [dict(r, **meta, floor_ms=None)
                 for r in extra_mode("merge_model", lambda: merge_model_bench.run(args.quick, log=print))]
    if "multi" in args.modes:
        from . import multi
        rows += [dict(r, **meta) for r in extra_mode("multi", lambda: multi.run(log=print))]
    if "nf4" in args.modes:
        from . import nf4_bench
        rows += [dict(r, **meta) for r in extra_mode("nf4", lambda: nf4_bench.run(log=print))]
    if "e2e" in args.modes:
        from . import e2e
        steps = args.loss_steps if args.loss_steps is not None else (50 if args.quick else 200)
        e2e_rows, curves = extra_mode("e2e", lambda: e2e.run(log=print, steps_curve=steps, compiled=not args.quick,
                                                           variants=args.e2e_variants, rounds=args.e2e_rounds,
                                                           steps=args.e2e_steps)) \
            or ([], None)
        rows += [dict(r, **meta, floor_ms=None) for r in e2e_rows]
    base = report.write_all(rows, meta, args.out)
    if curves:
        import json
        with open(base + "-loss.json", "w") as f:
            json.dump(curves, f)
        e2e.plot_curves(curves, base + "-loss.png")
    print(report.markdown(rows, meta))
    print(f"results: {base}.jsonl, {base}.md, {base}.png")
    return 0


def _cpu_demo_process(argv) -> None:
    """Starts this program again with TRITON_INTERPRET=1 where it is about to run the CPU demo without it:
    `python -m lora_kernels.bench` imports the package, and with it triton, before main runs, and triton
    reads the setting when its kernels are defined, so setting it now would leave them uncallable on the CPU.
    An explicit TRITON_INTERPRET (even 0) is kept."""
    if "TRITON_INTERPRET" in os.environ or not ("--cpu-demo" in argv or not torch.cuda.is_available()):
        return
    os.environ["TRITON_INTERPRET"] = "1"
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", "lora_kernels.bench", *argv])


if __name__ == "__main__":
    _cpu_demo_process(sys.argv[1:])
    sys.exit(main())
