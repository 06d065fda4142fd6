"""Grids sized to whole waves of resident programs, for the kernels that stream W with a grid of their own
choosing (merge, split-K decode).

How many CTAs of a compiled kernel one SM holds depends on its registers and shared memory, known only once
Triton has compiled and loaded it; it is read from the first launch of each variant and kept. A grid a little
larger than one wave leaves a trailing, nearly empty wave: the 151-register merge variant holds 3 CTAs per
SM, and a grid sized for 4 ran 1.45 waves at 4096², its last a third full."""
import torch

from . import configs

_resident: dict = {}  # variant -> CTAs per SM


def ctas_per_sm(n_regs: int, warps: int, shared: int, regs: int = 65536, smem: int = 228 * 1024) -> int:
    """CTAs of one kernel an SM holds at once, by registers (allocated per warp, 256 at a time), shared memory
    (1 KB reserved per CTA) and threads (2048), at most 32."""
    per_warp = configs.cdiv(n_regs * 32, 256) * 256
    return max(1, min(regs // (per_warp * warps), smem // (shared + 1024), 2048 // (32 * warps), 32))


def note(kernel, like, variant):
    """Keep the residency of `kernel` (a launched CompiledKernel) for `variant`, the first time it is known."""
    if variant in _resident or not like.is_cuda:
        return
    n_regs, meta = getattr(kernel, "n_regs", None), getattr(kernel, "metadata", None)
    warps, shared = getattr(meta, "num_warps", None), getattr(meta, "shared", None)
    if not n_regs or not warps or shared is None:
        return
    props = torch.cuda.get_device_properties(like.device)
    _resident[variant] = ctas_per_sm(n_regs, warps, shared, getattr(props, "regs_per_multiprocessor", 65536),
                                     getattr(props, "shared_memory_per_multiprocessor", 228 * 1024))


def known(variant) -> bool:
    return variant in _resident


def per_unit(units: int, k_max: int, like, variant, default: int = 4) -> int:
    """k in 1..k_max for a grid of k · units programs of equal work: the smallest k that fills its waves of
    resident CTAs (`default` per SM until the variant has launched) to 90 %, else the k that fills them best.
    Fewer programs reload less and reduce less."""
    slots = _resident.get(variant, default) * configs.sm_count(like)
    ks = range(1, max(1, k_max) + 1)

    def fill(k):
        return (k * units / slots) / configs.cdiv(k * units, slots)
    return next((k for k in ks if fill(k) >= 0.9), None) or max(ks, key=lambda k: (fill(k), -k))
