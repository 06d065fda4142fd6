"""Which backend runs: "torch" (reference), "triton", "cuda" (the compiled extension), or "auto".

"auto" never hides a slow path: the first time it picks a backend for a device it logs one line
saying which and why, and it warns once when only the unfused reference is available on a GPU.
"""
from __future__ import annotations

import importlib
import logging
import os
import warnings

import torch

from . import _env

log = logging.getLogger("lora_kernels")
NAMES = ("auto", "torch", "triton", "cuda")
_said: set = set()


def _once(key, msg, warn=False):
    if key in _said:
        return
    _said.add(key)
    if warn:
        warnings.warn(msg, stacklevel=3)
    else:
        log.info(msg)


_IMPORTABLE = {}


def _importable(module: str) -> bool:
    if module not in _IMPORTABLE:
        try:
            importlib.import_module(module)
            _IMPORTABLE[module] = True
        except Exception:  # noqa: BLE001 - any import failure means "not available"
            _IMPORTABLE[module] = False
    return _IMPORTABLE[module]


# Both probes are constants to torch.compile: tracing them would meet importlib (a graph break per call).
@torch.compiler.assume_constant_result
def triton_available() -> bool:
    return _importable("lora_kernels.triton")


@torch.compiler.assume_constant_result
def cuda_ext_available() -> bool:
    """Whether the CUDA extension is built and in use (LORA_KERNELS_NO_EXT=1 leaves a built one unused)."""
    if os.environ.get("LORA_KERNELS_NO_EXT") == "1" or not _importable("lora_kernels._C"):
        return False
    cuda_backend()  # registers the C++ ops' fake and autograd rules before anything traces them
    return True


_CUDA_BACKEND = []


def cuda_backend():
    """lora_kernels._cuda_backend, imported once; a plain attribute read afterwards (safe to trace)."""
    if not _CUDA_BACKEND:
        _CUDA_BACKEND.append(importlib.import_module("lora_kernels._cuda_backend"))
    return _CUDA_BACKEND[0]


def _check_name(backend):
    if backend not in NAMES:
        raise ValueError(f"backend: expected one of {NAMES}, got {backend!r}")


def _require(name: str, device_type: str, is_f64: bool):
    """Input problems (device, dtype) raise ValueError/TypeError; a missing build raises RuntimeError."""
    if name == "torch":
        return
    if is_f64:
        raise TypeError(f"backend={name!r}: float64 is not supported by the GPU kernels; use backend='torch'")
    if name == "triton":
        if not (device_type == "cuda" or _env.interpreting()):
            raise ValueError(f"backend='triton': tensors are on {device_type}; the Triton kernels need CUDA tensors "
                             "(or TRITON_INTERPRET=1 for the CPU interpreter)")
        if not triton_available():
            raise RuntimeError("backend='triton': triton could not be imported")
    elif name == "cuda":
        if device_type != "cuda":
            raise ValueError(f"backend='cuda': tensors are on {device_type}; the CUDA kernels need CUDA tensors")
        if not cuda_ext_available():
            raise RuntimeError("backend='cuda': the compiled extension lora_kernels._C is not built "
                               "(install with nvcc and a CUDA build of torch)")


def resolve(backend: str, t: torch.Tensor, prefer=("triton", "cuda"), what: str = "fused linear",
            reason: str = "preferred") -> str:
    """The backend that serves `what` for tensors like t: the first available of `prefer` on CUDA tensors,
    the torch reference otherwise. The first choice per device and op family is logged once."""
    return _choose(backend, t.device.type, str(t.device), t.dtype == torch.float64, prefer, what, reason)


# A constant to torch.compile: run as plain Python while tracing, never traced. Tracing it would meet the
# log call (a graph break in every LoRA layer) and guard on the set of lines already said (recompiles).
@torch.compiler.assume_constant_result
def _choose(backend: str, device_type: str, device: str, is_f64: bool, prefer: tuple, what: str,
            reason: str) -> str:
    _check_name(backend)
    if backend != "auto":
        _require(backend, device_type, is_f64)
        return backend
    if device_type != "cuda" or is_f64:
        _once(("torch", what, device_type), f"lora_kernels: {what} on {device_type} tensors -> torch reference")
        return "torch"
    available = {"triton": triton_available, "cuda": cuda_ext_available}
    for name in prefer:
        if available[name]():
            why = reason if name == prefer[0] else f"{prefer[0]} unavailable"
            slower = name != prefer[0] and what == "fused linear"
            if slower:
                # Measured on an H200, a patched 1.1B Llama's eager training step against peft's: 0.92x
                # without the extension (bench/results/nvidia-h200x2-20261130-8ce7e1e-e2e-noext.md), 1.35-1.47x
                # with it (nvidia-h200x2-20261130-5a443ba-e2e.md, nvidia-h200x2-20261130-8ce7e1e-e2e-*.md).
                why += ("; without the CUDA extension a training step is measured ~1.5x slower (0.92x peft's "
                        "eager step against 1.35-1.47x with it): install where nvcc and a CUDA build of torch "
                        "are found to build it")
            _once((name, what, device, why), f"lora_kernels: {what} on {device} -> {name} backend ({why})",
                  warn=slower)
            return name
    _once(("slow", what, device), f"lora_kernels: neither triton nor the CUDA extension is available on "
          f"{device}; {what} runs the unfused torch reference (slow)", warn=True)
    return "torch"


# Measured on an H100 (bench/results/profile-h100-20261123-run4.log, GPU time per forward at 4096x4096,
# r=16): the CUDA backend (cuBLAS GEMMs composed in C++, the decode kernel at 1-2 rows) took 19.4 / 18.8 /
# 19.4 / 110.6 / 417.9 us at 1 / 16 / 64 / 2048 / 8192 rows against Triton's 28.3 / 23.8 / 24.8 / 118.9 /
# 491.5, and its train steps were faster too (1.45 vs 2.17 of the base in the bench).
def resolve_linear(backend: str, x: torch.Tensor, tensor_scaling: bool = False, what: str = "fused linear") -> str:
    if tensor_scaling:
        # The C++ ops take the scaling as a float (a device-to-host read per call, and none is allowed
        # inside a captured CUDA graph); the Triton kernels read it from device memory.
        return resolve(backend, x, prefer=("triton", "cuda"), what=what + " (tensor scaling)",
                       reason="reads the scaling on the device")
    # Where Triton is available too, ops.lora_linear then times both per shape and mode (auto_linear).
    return resolve(backend, x, prefer=("cuda", "triton"), what=what,
                   reason="faster in the measurements above; with Triton too, chosen per shape by timing both")


def resolve_merge(backend: str, w: torch.Tensor) -> str:
    """Merge prefers Triton (measured 1.2x a copy of W on an H100, the CUDA kernel 2.7x), then CUDA."""
    return resolve(backend, w, prefer=("triton", "cuda"), what="merge", reason="fastest measured")


def module(name: str):
    if name == "triton":
        return importlib.import_module("lora_kernels.triton")
    if name == "cuda":
        return cuda_backend()
    raise ValueError(f"backend: no kernel module for {name!r}")
