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
    libstdcxx = _loaded_libstdcxx()
    ext = CUDAExtension(
        "lora_kernels._C", sources, include_dirs=include_dirs,
        define_macros=[("LORA_KERNELS_WITH_CUDA", None), ("LORA_KERNELS_PYTHON_MODULE", None)],
        extra_compile_args={"cxx": ["-O3"],
                            "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"] + gencode},
        extra_link_args=[libstdcxx] if libstdcxx else [],
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_ext()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
