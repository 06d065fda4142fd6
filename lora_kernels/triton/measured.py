"""Choosing between kernels that compute the same result, by measuring them on the shape at hand.

Used where neither path wins everywhere (split-K vs one GEMM for few rows; a 4-bit weight dequantised for
cuBLAS vs dequantised inside our GEMM). Each shape key is decided once, on its first eager call, by wall
time per call issued back to back: GPU time where the GPU is the bound, host time where the host is. One
choice per key, so eager calls and CUDA-graph replays of a process give the same bits.
"""
import os
import time
import warnings

import torch

from . import configs

_chosen: dict = {}


def wall_ms(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / reps


def decided(key, env: str, names) -> "str | None":
    """The name forced by `env` (when one of names) or already chosen for key; None while undecided."""
    forced = os.environ.get(env)
    return forced if forced in names else _chosen.get(key)


def choose(key, options: dict, default: str, env: str) -> str:
    """The name in `options` (name -> zero-argument callable) that runs `key`'s shape fastest. The variable
    `env` forces a name. Nothing is timed, and `default` is returned undecided, under the Triton
    interpreter, inside CUDA-graph capture or in sync-debug mode (timing would synchronise). A path that
    raises while timed is left out with a warning; if every path raises, the default's error is raised."""
    forced = os.environ.get(env)
    if forced in options:
        return forced
    pick = _chosen.get(key)
    if pick is None:
        if (configs.interpreting() or torch.cuda.is_current_stream_capturing()
                or torch.cuda.get_sync_debug_mode() != 0):
            return default
        times, errors = {}, {}
        for name, fn in options.items():
            try:
                times[name] = wall_ms(fn)
            except Exception as e:  # noqa: BLE001 - a path that cannot run this shape is not chosen
                errors[name] = e
        if not times:
            raise errors[default] if default in errors else next(iter(errors.values()))
        for name, e in errors.items():
            warnings.warn(f"lora_kernels: the {name!r} path failed on {key} ({type(e).__name__}: "
                          f"{str(e)[:200]}); using {min(times, key=times.get)!r} for this shape", stacklevel=3)
        pick = _chosen[key] = min(times, key=times.get)
    return pick
