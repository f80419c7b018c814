"""Every kernel file belongs to an op the backend registry declares, and every declared kernel has
its file and is in the built extension; the CUDA sources compile (device code for sm_90 included)
wherever nvcc exists, even without a GPU or a CUDA build of torch (test_gpu.py runs them)."""

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

import sparsemem as sm
from sparsemem import _backends

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))


LAYERS = {"cpp": ("csrc/cpu", ".cpp"), "cuda": ("csrc/cuda", ".cu"), "triton": ("kernels", ".py")}


def test_kernel_files_and_declared_kernels_agree():
    # ops/<stem>.py, and a file of that stem in each layer the op declares a kernel in; and every
    # kernel file (not a shared _helper) is the stem of an op declaring a kernel there
    declared = {backend: set() for backend in LAYERS}
    for op in _backends.ops():
        info = _backends.op_info(op)
        assert (ROOT / "sparsemem" / "ops" / f"{info.stem}.py").exists(), op
        for backend in set(info.backends) - {"torch"}:
            folder, suffix = LAYERS[backend]
            assert (ROOT / folder / f"{info.stem}{suffix}").exists(), f"{op} declares {backend}: no {info.stem}{suffix}"
            declared[backend].add(info.stem)
    for backend, (folder, suffix) in LAYERS.items():
        stems = {path.stem for path in (ROOT / folder).glob(f"*{suffix}") if not path.stem.startswith("_")}
        assert stems == declared[backend], f"{folder}: files without a declared op, or the reverse"


def test_the_extension_has_every_declared_compiled_kernel():
    # setup.py compiles every csrc/cpu/*.cpp (and, with CUDA, csrc/cuda/*.cu): each op declaring a
    # cpp (cuda) kernel then runs on that backend here
    built = {"cpp": _backends.availability()["cpp"] is None}
    built["cuda"] = built["cpp"] and torch.cuda.is_available() and "cuda" in torch.ops.sparsemem.ext_info()
    if not built["cpp"]:
        pytest.skip(_backends.availability()["cpp"])
    for backend, device in (("cpp", "cpu"), ("cuda", "cuda")):
        for op in _backends.ops():
            if built[backend] and backend in _backends.op_info(op).backends:
                assert backend in sm.backends_for(op, device).runnable, sm.backends_for(op, device).unavailable


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_cuda_sources_compile(tmp_path):
    # One translation unit that includes every .cu file parses the torch headers once (~30 s, not
    # ~30 s a file); the files keep their kernels in named namespaces so they can share a unit.
    unit = tmp_path / "all_cuda.cu"
    unit.write_text("".join(f'#include "{source}"\n' for source in SOURCES))
    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    # A CPU wheel of torch ships c10/cuda headers without this generated one (it only sets the
    # shared-library export macro); the stub stands in for it, a CUDA torch has the real file.
    if not any((Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in includes):
        stub = tmp_path / "stub" / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
        stub.parent.mkdir(parents=True)
        stub.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.append(str(tmp_path / "stub"))
    command = [
        "nvcc",
        "-std=c++20",
        "-arch=sm_90",
        "-c",
        str(unit),
        "-o",
        str(tmp_path / "all_cuda.o"),
        "-DSPARSEMEM_WITH_CUDA",
        *cpp_extension.COMMON_NVCC_FLAGS,
        *(f"-I{p}" for p in includes),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-6000:]
