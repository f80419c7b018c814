import os

import pytest
import torch

from sparsemem import _backends


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def cpu_backends(op: str) -> list[str]:
    """Backends that implement `op` and can run it on CPU tensors here."""
    return [
        backend
        for backend in _backends._KERNELS[op]
        if _backends.availability()[backend] is None and _backends._runs_on(backend, "cpu")
    ]


@pytest.fixture
def one_thread():
    """torch on one thread for the test: tiny ops run fastest so and never fight other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def use_backend(monkeypatch):
    """use_backend("cpp") forces that backend for the rest of the test."""

    def force(backend: str) -> None:
        monkeypatch.setenv("SPARSEMEM_BACKEND", backend)

    yield force
    os.environ.pop("SPARSEMEM_BACKEND", None)
