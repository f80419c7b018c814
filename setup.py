"""Builds sparsemem._C: C++ CPU kernels (OpenMP) always when a compiler exists, CUDA too when
torch has CUDA and nvcc is found. Never downloads anything.

Switches:
  SPARSEMEM_BUILD_EXT=auto|0|1   auto: build, and install without the extension if the build fails;
                                 0: skip it (torch backend only); 1: a failed build is an error.
  SPARSEMEM_CUDA_ARCHS="9.0;8.0" CUDA architectures (default: the local GPU's, via TORCH_CUDA_ARCH_LIST).
  MAX_JOBS=N                     parallel compile jobs (ninja).
"""

import glob
import os
import sys

from setuptools import find_packages, setup

MODE = os.environ.get("SPARSEMEM_BUILD_EXT", "auto").lower()
if MODE not in ("auto", "0", "1"):
    sys.exit(f"SPARSEMEM_BUILD_EXT={MODE!r}; expected auto, 0 or 1")


def extension_modules():
    if MODE == "0":
        return [], {}
    from torch.utils import cpp_extension

    sources = ["csrc/ext.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    cxx_flags = ["-O3", "-fopenmp"]
    use_cuda = cpp_extension.CUDA_HOME is not None and _torch_has_cuda()
    if use_cuda:
        if "SPARSEMEM_CUDA_ARCHS" in os.environ:
            os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ["SPARSEMEM_CUDA_ARCHS"]
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        extension_class = cpp_extension.CUDAExtension
        flags = {"cxx": [*cxx_flags, "-DSPARSEMEM_WITH_CUDA"], "nvcc": ["-O3", "-DSPARSEMEM_WITH_CUDA"]}
    else:
        extension_class = cpp_extension.CppExtension
        flags = {"cxx": cxx_flags}
    module = extension_class("sparsemem._C", sources, extra_compile_args=flags, extra_link_args=["-fopenmp"])
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [module], {"build_ext": _tolerant(build_ext) if MODE == "auto" else build_ext}


def _torch_has_cuda() -> bool:
    import torch

    return torch.version.cuda is not None


def _tolerant(build_ext):
    """In auto mode a failed build leaves a working package with the torch backend only."""

    class TolerantBuildExt(build_ext):
        def run(self):
            try:
                super().run()
            except Exception as error:
                print(f"sparsemem: building the C++ extension failed ({error}); the torch backend will be used")

    return TolerantBuildExt


ext_modules, cmdclass = extension_modules()
setup(
    # kernels/ sits at the top of the repository (Triton code beside csrc/) and installs as sparsemem.kernels.
    packages=[*find_packages(include=["sparsemem", "sparsemem.*"]), "sparsemem.kernels"],
    package_dir={"sparsemem.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
