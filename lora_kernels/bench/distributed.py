"""python -m lora_kernels.bench.distributed: step time of a patched peft model vs plain peft under DDP and FSDP2
(fully_shard) on N processes (NCCL, one GPU a rank; gloo on the CPU with the reference backend elsewhere), and a
check that each layout's first-step loss and adapter gradients equal one process over the whole global batch."""
import argparse
import contextlib
import datetime
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from . import e2e, report
from .gpu import git_sha

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048)
CONFIGS = {"tiny": TINY, "tinyllama": e2e.TINYLLAMA}
WRAPPERS, PROVIDERS = ("ddp", "fsdp2"), ("peft", "patched")
# Pass: |loss - ref| <= loss·|ref| and max|grad - ref| <= grad·max|ref grad|. float32: only summation orders differ
# (one matmul over the global batch vs shards averaged by the collective). bf16 (unit roundoff 2^-8 ≈ 0.4%): the
# shard's smaller matmuls pick other tilings / split-K, so every layer rounds differently, compounding over 22
# layers forward and back; 5% still fails a missing average (×N) or a lost shard. Tighten once 2 GPUs have run it.
TOLERANCE = {"float32": dict(loss=1e-5, grad=1e-4), "bfloat16": dict(loss=1e-2, grad=5e-2)}
MiB = 1 << 20


def _build(patched, cfg, device, dtype, backend):
    model, _, _ = e2e.build(patched, False, cfg, device=device, dtype=dtype, backend=backend)
    # peft starts lora_B at zero, which would leave every lora_A gradient of the first step zero and unchecked.
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    return model


@contextlib.contextmanager
def _lora_dropout_off(model):
    # Masks depend on how the batch is split; peft's nn.Dropout and the patched forward both read p per call.
    drops = {m: m.p for n, m in model.named_modules() if ".lora_dropout." in n and isinstance(m, torch.nn.Dropout)}
    for d in drops:
        d.p = 0.0
    try:
        yield
    finally:
        for d, p in drops.items():
            d.p = p


def _loss_and_grads(fwd, model, ids):
    """Loss and whole adapter gradients (CPU, float32) of one forward/backward with the LoRA dropout off."""
    with _lora_dropout_off(model):
        loss = fwd(input_ids=ids, labels=ids).loss
        loss.backward()
    # FSDP2 holds each rank's shard as a DTensor; full_tensor() is a collective, so every rank gathers them all.
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().float().cpu()
             for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.detach().float().clone(), grads


def _wrap(model, wrapper, device):
    if wrapper == "ddp":
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[torch.cuda.current_device()] if device == "cuda" else None)
    from torch.distributed.fsdp import fully_shard
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    return fully_shard(model)


def _allocated(device):  # the CPU's peak is not tracked
    return torch.cuda.memory_allocated() if device == "cuda" else 0


class _Run:
    """One (wrapper, provider) pair, held for the whole run so that the timed rounds can be interleaved."""

    def __init__(self, wrapper, provider, cfg, device, dtype, backend):
        self.wrapper, self.provider, self.device = wrapper, provider, device
        self.before, self.resident, self.peak, self.round_ms = _allocated(device), 0, 0, []
        self.model = _build(provider == "patched", cfg, device, dtype, backend)
        self.fwd = _wrap(self.model, wrapper, device)
        # Made after wrapping: fully_shard swaps the parameters for sharded DTensors.
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)

    def first_step(self, ids, world):
        loss, grads = _loss_and_grads(self.fwd, self.model, ids)
        dist.all_reduce(loss)  # the mean over ranks; gloo has no AVG
        self.opt.zero_grad(set_to_none=True)
        return float(loss) / world, grads

    def steps(self, ids, n):
        for _ in range(n):
            e2e._step(self.fwd, self.opt, ids)
        e2e._sync(self.device)

    def timed_round(self, ids, steps):
        e2e._sync(self.device)
        dist.barrier()
        base = _allocated(self.device)
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        self.steps(ids, steps)
        dist.barrier()  # a step takes as long as its slowest rank
        self.round_ms.append((time.perf_counter() - t0) * 1e3 / steps)
        if self.device == "cuda":
            self.peak = max(self.peak, torch.cuda.max_memory_allocated() - base + self.resident)


def _reference(provider, ids, *build_args):
    model = _build(provider == "patched", *build_args)  # freed on return, before the distributed pairs are built
    return _loss_and_grads(model, model, ids)


def _compare(loss, grads, ref, tol):
    ref_loss, ref_grads = float(ref[0]), ref[1]
    same = bool(ref_grads) and grads.keys() == ref_grads.keys()
    grad_diff = max((grads[k] - ref_grads[k]).abs().max().item() for k in ref_grads) if same else float("inf")
    scale = max((g.abs().max().item() for g in ref_grads.values()), default=0.0)
    loss_diff = abs(loss - ref_loss)
    return dict(loss=loss, ref_loss=ref_loss, loss_diff=loss_diff, grad_max_diff=grad_diff, grad_max_ref=scale,
                grads_checked=len(ref_grads),
                passed=same and loss_diff <= tol["loss"] * abs(ref_loss) and grad_diff <= tol["grad"] * scale)


def _measure(rank, world, device, args, meta):
    dtype, cfg = getattr(torch, meta["dtype"]), CONFIGS[meta["config"]]
    backend = "auto" if device == "cuda" else "torch"
    batch = e2e._batches(1, args.batch_per_rank * world, args.seq, cfg["vocab_size"], device=device)[0]
    shard = batch.chunk(world)[rank]
    # The reference: one process over the whole global batch. Equal shards, no padding: the mean of the ranks'
    # mean losses is its mean loss, and the ranks' averaged gradients are its gradients.
    refs = {p: _reference(p, batch, cfg, device, dtype, backend) for p in PROVIDERS} if rank == 0 else {}
    dist.barrier()
    runs, checks = [], {}
    for wrapper in WRAPPERS:
        for provider in PROVIDERS:
            run = _Run(wrapper, provider, cfg, device, dtype, backend)
            loss, grads = run.first_step(shard, world)
            if rank == 0:
                checks[wrapper, provider] = _compare(loss, grads, refs[provider], TOLERANCE[meta["dtype"]])
            run.steps(shard, args.warmup)
            # What the pair keeps between steps (weights, optimizer state, DDP buckets): its peak without the others'.
            run.resident = _allocated(device) - run.before
            runs.append(run)
    # Every pair runs its steps in each round in turn: a slow spell of the host falls on all of them alike.
    for _ in range(args.rounds):
        for run in runs:
            run.timed_round(shard, args.steps)
    peaks = torch.tensor([r.peak for r in runs], dtype=torch.float64, device=device)
    all_peaks = [torch.zeros_like(peaks) for _ in range(world)]
    dist.all_gather(all_peaks, peaks)
    rows = []
    for i, run in enumerate(runs):
        base = next(r for r in runs if r.wrapper == run.wrapper and r.provider == "peft")
        per_round = [b / m for b, m in zip(base.round_ms, run.round_ms)]
        ms = statistics.median(run.round_ms)
        rows.append(dict(op="distributed", mode="distributed", wrapper=run.wrapper, provider=run.provider,
                         batch_per_rank=args.batch_per_rank, seq=args.seq, r=16, dropout=0.05,
                         rounds=args.rounds, steps_per_round=args.steps, p50_ms=ms, round_ms=run.round_ms,
                         speedup=statistics.median(base.round_ms) / ms, speedup_min=min(per_round),
                         speedup_max=max(per_round), tokens_per_s=world * args.batch_per_rank * args.seq / ms * 1e3,
                         peak_mib_per_rank=[float(p[i]) / MiB for p in all_peaks], timing="wall, interleaved",
                         tolerance=TOLERANCE[meta["dtype"]], **checks.get((run.wrapper, run.provider), {}), **meta))
    return rows


def markdown(rows, meta) -> str:
    tol, r0 = TOLERANCE[meta["dtype"]], rows[0]
    out = [(f"{meta['gpu']} × {meta['world']} ({meta['backend']}) · {meta['config']} in {meta['dtype']}, batch "
            f"{r0['batch_per_rank']}×{r0['seq']} a rank · torch {meta['torch']} · git {meta['sha']} · {meta['time']}"),
           "", (f"ms/step: median over {r0['rounds']} interleaved rounds of {r0['steps_per_round']} steps (AdamW on "
                "the adapters, lora_dropout 0.05); speed-up over peft under the same wrapper (per-round range); peak: "
                "the most any rank held for the pair. Diffs: first step, dropout off, vs one process over the global "
                f"batch; pass: grad max diff ≤ {tol['grad']:g}× the largest reference gradient, loss within "
                f"{tol['loss']:g} relative."), "",
           ("| wrapper | provider | ms/step | speed-up vs peft | tokens/s | peak MiB | loss diff | grad max diff "
            "| pass |"), "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = max(r["peak_mib_per_rank"])
        out.append(f"| {r['wrapper']} | {r['provider']} | {r['p50_ms']:.1f} | {r['speedup']:.3f} "
                   f"({r['speedup_min']:.2f}–{r['speedup_max']:.2f}) | {r['tokens_per_s']:.0f} | "
                   f"{f'{peak:.0f}' if peak else '–'} | {r['loss_diff']:.2e} | {r['grad_max_diff']:.2e} "
                   f"(of {r['grad_max_ref']:.2e}) | {'yes' if r['passed'] else 'NO'} |")
    return "\n".join(out) + "\n"


def spawn(fn, args, nprocs: int, cpu: bool):
    """mp.spawn; gloo ranks on the CPU of a GPU machine start with the GPUs hidden (CUDA_VISIBLE_DEVICES=""):
    FSDP2's device mesh otherwise picks a GPU per rank by itself, and such runs died with SIGSEGV there."""
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # read by the children at start; this process's CUDA is set up
    try:
        mp.spawn(fn, args=args, nprocs=nprocs, join=True)
    finally:
        if cpu and saved is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        elif cpu:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved


def _worker(rank, world, port, args, meta, base):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = "cuda" if meta["backend"] == "nccl" else "cpu"
    if device == "cuda":
        torch.cuda.set_device(rank)  # "cuda" below then means this rank's GPU
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # the ranks share the cores
    dist.init_process_group(meta["backend"], rank=rank, world_size=world, timeout=datetime.timedelta(minutes=10),
                            device_id=torch.device("cuda", rank) if device == "cuda" else None)
    try:
        rows = _measure(rank, world, device, args, meta)
        if rank == 0:
            report.write_jsonl(rows, base + ".jsonl")
            with open(base + ".md", "w") as f:
                f.write(markdown(rows, meta))
        dist.barrier()  # neither rank tears down while the other may still be in a collective
    finally:
        dist.destroy_process_group()
    # As in tests/test_distributed.py: FSDP2's device mesh keeps the gloo group alive past destroy_process_group,
    # and tearing it down at interpreter exit can abort; the results are on disk, so a hard exit loses nothing.
    sys.stdout.flush()
    os._exit(0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lora_kernels.bench.distributed", description=__doc__)
    for flag, default in (("--nproc", 2), ("--rounds", 3), ("--batch-per-rank", 1), ("--seq", 2048)):
        ap.add_argument(flag, type=int, default=default)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per pair per round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per pair before the rounds")
    ap.add_argument("--config", choices=list(CONFIGS), help="model shape (default: tinyllama on GPUs, tiny on CPU)")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--cpu", action="store_true", help="gloo on the CPU even where there are enough GPUs")
    args = ap.parse_args(argv)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off: it can disturb shared hosts
    gpus = not args.cpu and torch.cuda.is_available() and torch.cuda.device_count() >= args.nproc
    meta = dict(gpu=torch.cuda.get_device_name() if gpus else "cpu", torch=torch.__version__, sha=git_sha(),
                time=datetime.datetime.now().isoformat(timespec="seconds"), world=args.nproc,
                backend="nccl" if gpus else "gloo", config=args.config or ("tinyllama" if gpus else "tiny"),
                dtype="bfloat16" if gpus else "float32")
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, report.stem(meta) + "-distributed")
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spawn(_worker, (args.nproc, port, args, meta, base), args.nproc, cpu=meta["backend"] == "gloo")
    with open(base + ".jsonl") as f:
        rows = [json.loads(line) for line in f]
    print(markdown(rows, meta))
    print(f"results: {base}.jsonl, {base}.md")
    return 0 if rows and all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
