"""lora_kernels: fused LoRA linear layers for PyTorch (Triton, C++/CUDA and a torch reference)."""
from . import reference  # noqa: F401
from ._backends import cuda_ext_available, triton_available  # noqa: F401
from .modules import FusedLoRALinear  # noqa: F401
from .ops import lora_linear, merge_, unmerge_  # noqa: F401
from .patch import patch, unpatch  # noqa: F401
from .merging import merge_model, unmerge_model  # noqa: F401
from .multi import LoRAAdapterBank, multi_lora_linear  # noqa: F401
from .nf4 import FusedLoRALinear4bit, lora4_linear  # noqa: F401
from . import io, nf4  # noqa: F401

__version__ = "0.1.0"
__all__ = ["FusedLoRALinear", "lora_linear", "merge_", "unmerge_", "reference", "triton_available",
           "cuda_ext_available", "patch", "unpatch", "merge_model", "unmerge_model", "LoRAAdapterBank",
           "multi_lora_linear", "FusedLoRALinear4bit", "lora4_linear"]
