"""Choosing between kernels that compute the same result, by measuring them on the shape at hand.

Used where neither path wins everywhere (split-K vs one GEMM for few rows; a 4-bit weight dequantised for
cuBLAS vs dequantised inside our GEMM; TMA vs pointer loads for the GEMM's tiles). Each shape key is decided
once, on its first eager call, so eager calls and CUDA-graph replays of a process give the same bits.
Two timers: `gpu_ms`, the kernels' own time (host time hidden behind a spin kernel), for choices between
kernel variants whose host cost is alike: decode is served under CUDA graphs, where only GPU time counts,
and a slow host would otherwise decide by the number of launches (on an H200 host, the NF4 decode took the
one-launch path at 36 µs of GPU time over split-K's 22). `cold_ms`, per call after the L2 cache is
overwritten, host time counted where it exceeds the GPU's, where host costs differ and count (`auto`
between the CUDA extension and Triton in eager mode).
"""
import contextlib
import warnings

import torch

from .. import _env
from . import configs

_chosen: dict = {}
_timings: dict = {}  # key -> {name: best ms} of the timing that decided it, for the log line that reports it
# Paths are timed in turn this many times and each keeps its best time: on the H200 machine single timings
# of host-bound calls varied by 10-50 % between runs, enough to pick the slower path now and then.
ROUNDS = 3


def cold_ms(fn, reps=10):
    """Median ms per call, each call between its own events right after the L2 cache is overwritten, as the
    bench (triton's do_bench) times a row: a layer in a model finds neither its weight nor its input left in
    L2 by the same call just before, and a call whose host time exceeds its GPU time is timed by its host
    time. (Calls back to back with a warm cache disagreed with the bench by as much as the backends
    differ.) Runs on the current device."""
    fn()
    torch.cuda.synchronize()
    l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    flush = torch.empty(max(2 * l2, 1 << 20) // 4, dtype=torch.int32, device="cuda")
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) for start, end in events)
    return times[len(times) // 2]


# Spin long enough that every timed call is queued before the first one runs (20 calls of up to ~0.3 ms of
# host each); cycles at ~2 GHz.
_HOLD_CYCLES = 20_000_000


def gpu_ms(fn, reps=20):
    """GPU time per call: the stream is held by a spin kernel while the calls are queued, so the events
    around them measure the kernels back to back, not the host's gaps between launches."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(_HOLD_CYCLES)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def decided(key, env: str, names) -> "str | None":
    """The name forced by `env` (when one of names) or already chosen for key; None while undecided."""
    forced = _env.get(env)
    return forced if forced in names else _chosen.get(key)


def choose(key, options: dict, default: str, env: str, by: str = "cold") -> str:
    """The name in `options` (name -> zero-argument callable) that runs `key`'s shape fastest, by `cold_ms`
    (by="cold") or `gpu_ms` (by="gpu"). The variable `env` forces a name. Nothing is timed, and `default` is
    returned undecided, under the Triton interpreter, inside CUDA-graph capture or in sync-debug mode (timing
    would synchronise). A path that raises while timed is left out with a warning; if every path raises, the
    default's error is raised."""
    forced = _env.get(env)
    if forced in options:
        return forced
    pick = _chosen.get(key)
    if pick is None:
        if (configs.interpreting() or torch.cuda.is_current_stream_capturing()
                or torch.cuda.get_sync_debug_mode() != 0):
            return default
        timer = gpu_ms if by == "gpu" else cold_ms
        times, errors = {}, {}
        # the timers' events and flushes go to the device the key names (every key names its tensors' device)
        device = next((k for k in key if isinstance(k, torch.device) and k.type == "cuda"), None)
        with torch.cuda.device(device) if device is not None else contextlib.nullcontext():
            for _ in range(ROUNDS):  # interleaved rounds, best of each: a hiccup of the host decides nothing
                for name, fn in options.items():
                    if name in errors:
                        continue
                    try:
                        times[name] = min(timer(fn), times.get(name, float("inf")))
                    except Exception as e:  # noqa: BLE001 - a path that cannot run this shape is not chosen
                        errors[name] = e
                        times.pop(name, None)
        if not times:
            raise errors[default] if default in errors else next(iter(errors.values()))
        for name, e in errors.items():
            warnings.warn(f"lora_kernels: the {name!r} path failed on {key} ({type(e).__name__}: "
                          f"{str(e)[:200]}); using {min(times, key=times.get)!r} for this shape", stacklevel=3)
        pick = _chosen[key] = min(times, key=times.get)
        _timings[key] = times
    return pick


def timings(key) -> str:
    """The times that decided `key`, as "name 1.234 ms, ..." (empty when forced or not timed)."""
    return ", ".join(f"{name} {ms:.3f} ms" for name, ms in sorted(_timings.get(key, {}).items()))
