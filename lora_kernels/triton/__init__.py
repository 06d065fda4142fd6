"""Triton backend: @triton.jit kernels and their launchers, one file per op family."""
from . import configs  # noqa: F401
from .fused_linear import NF4Operand, backward, forward  # noqa: F401
from .measured import choose  # noqa: F401
from .nf4_tile import decode_absmax, dequantize  # noqa: F401
from .merge import merge_, merge_group_  # noqa: F401
from .multi import multi_forward  # noqa: F401
