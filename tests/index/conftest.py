import os

import pytest

from sparsemem.index import base

# OpenMP thread teams spin on a busy 2-core machine: faiss runs these small searches fastest on one thread.
os.environ.setdefault("SPARSEMEM_THREADS", "1")


@pytest.fixture(autouse=True)
def host_path(monkeypatch):
    """These tests take an ExactIndex's two paths one at a time: the host path at every size here
    (by default a memory of at most DENSE_VALUES values takes the device path on the CPU too), the
    device path where a test patches sparsemem._checks.on_host."""
    monkeypatch.setattr(base, "DENSE_VALUES", 0)
