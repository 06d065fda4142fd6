"""Build: the CUDA extension lora_kernels._C when nvcc and a CUDA build of torch are present.

Without them (or with LORA_KERNELS_NO_EXT=1) this is a pure-Python install and says so once.
"""
import glob
import os
import sys

from setuptools import setup


def _loaded_libstdcxx():
    """Path of the libstdc++ this process (torch) has loaded, or None off Linux.

    Some compilers (a g++ configured to link libstdc++ statically) would give the extension a private copy of
    the C++ runtime; an exception thrown there (every TORCH_CHECK) and caught by torch's copy crashed the
    process. Linking torch's own libstdc++ by path keeps one runtime, whatever the compiler's defaults."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if os.path.basename(path).startswith("libstdc++.so"):
                    return path
    except OSError:
        pass
    return None


def _cutlass_includes():
    """CUTLASS's header folders (the nvidia-cutlass wheel's copy, or $CUTLASS_PATH), or None: without them the
    one-GEMM LoRA kernel (csrc/cuda/lowrank_gemm.cu) is left out and the cuBLAS forms serve alone."""
    root = os.environ.get("CUTLASS_PATH")
    if not root:
        import importlib.util
        spec = importlib.util.find_spec("cutlass_library")
        if spec is None or not spec.submodule_search_locations:
            return None
        root = os.path.join(list(spec.submodule_search_locations)[0], "source")
    dirs = [os.path.join(root, "include"), os.path.join(root, "tools", "util", "include")]
    return dirs if all(os.path.isdir(d) for d in dirs) else None


def _cuda_ext():
    if os.environ.get("LORA_KERNELS_NO_EXT") == "1":
        print("lora_kernels: LORA_KERNELS_NO_EXT=1, pure-Python install (no CUDA extension)", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        print("lora_kernels: torch not importable at build time; pure-Python install", file=sys.stderr)
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        print("lora_kernels: no nvcc or a CPU-only torch; pure-Python install (no CUDA extension)",
              file=sys.stderr)
        return [], {}
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    include_dirs = [os.path.join(here, "csrc")]
    # cuBLAS / cuSPARSE headers ship in the pip wheels (nvidia/cu13/include), not always in the toolkit.
    for site in sys.path:
        cand = os.path.join(site, "nvidia", "cu13", "include")
        if os.path.isdir(cand):
            include_dirs.append(cand)
            break
    archs = os.environ.get("LORA_KERNELS_ARCHS", "80;90;90a").split(";")
    gencode = []
    for a in archs:
        gencode += [f"-gencode=arch=compute_{a},code=sm_{a}"]
    macros = [("LORA_KERNELS_WITH_CUDA", None), ("LORA_KERNELS_PYTHON_MODULE", None)]
    cutlass = _cutlass_includes()
    if cutlass and "90a" in archs:
        include_dirs += cutlass
        macros.append(("LORA_KERNELS_WITH_CUTLASS", None))
    else:
        print("lora_kernels: building without the CUTLASS one-GEMM kernel (" +
              ("no sm_90a in LORA_KERNELS_ARCHS" if cutlass else "no CUTLASS headers: pip install nvidia-cutlass")
              + ")", file=sys.stderr)
    libstdcxx = _loaded_libstdcxx()
    ext = CUDAExtension(
        "lora_kernels._C", sources, include_dirs=include_dirs, define_macros=macros,
        extra_compile_args={"cxx": ["-O3"],
                            "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"] + gencode},
        extra_link_args=[libstdcxx] if libstdcxx else [],
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_ext()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
