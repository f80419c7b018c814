"""The CUDA sources compile (device code for sm_90 included) wherever nvcc exists, even without a GPU
or a CUDA build of torch; the gpu-marked tests in test_gpu.py run them."""

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))


def test_every_kernel_file_is_checked():
    # the glob above picks up every .cu file: the dense ops' and the sparse ops' (topk_content,
    # sparse_read, sparse_write, sparse_links), which no CPU-only run executes
    names = {source.stem for source in SOURCES}
    assert {"content", "allocation", "links", "memory_rw"} <= names
    assert {"topk_content", "sparse_read", "sparse_write", "sparse_links"} <= names


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
