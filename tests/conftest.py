import pytest
import torch

import sparsemem as sm
from sparsemem import reference
from sparsemem.memory import SAMMemory, SDNCMemory


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def cpu_backends(op: str) -> list[str]:
    """Backends that implement `op` and can run it on CPU tensors here."""
    return list(sm.backends_for(op, "cpu").runnable)


def sparse_step_loops(monkeypatch, max_slots: int | None = None) -> None:
    """sm.SAM and sm.SDNC run their step loops, not their one op, above max_slots slots (None: at
    any N): each memory class holds its own sequence_max_slots."""
    for memory in (SAMMemory, SDNCMemory):
        monkeypatch.setattr(memory, "sequence_max_slots", max_slots)


def run_backward(outputs, leaves):
    """Gradients of the float outputs with seeded random upstream gradients -> (grads, seeds)."""
    outputs = [o for o in outputs if o.is_floating_point()]
    seeds = [torch.randn(o.shape, generator=torch.Generator().manual_seed(1), dtype=o.dtype) for o in outputs]
    return torch.autograd.grad(outputs, leaves, seeds), seeds


def reference_with_grads(op: str, args: tuple, seeds: list) -> tuple[tuple, tuple]:
    """The reference's outputs and input gradients (float64) for upstream gradients `seeds`."""
    leaves = [a.detach().double().requires_grad_(True) for a in args]
    outputs = getattr(reference, f"{op}_ref")(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    grads = torch.autograd.grad(outputs, leaves, [s.double() for s in seeds])
    return tuple(o.detach() for o in outputs), grads


@pytest.fixture
def one_thread():
    """torch on one thread for the test: tiny ops run fastest so and never fight other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def nan_poisoned():
    """Every tensor torch allocates uninitialised (at::empty in the C++ kernels, torch.empty in the
    triton wrappers) starts as NaN, integers as their largest value, so an element no kernel writes
    shows: torch fills uninitialised memory when deterministic algorithms are on."""
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    assert torch.empty(4).isnan().all(), "the poisoning these tests rely on is off"
    yield
    torch.use_deterministic_algorithms(False)


@pytest.fixture
def use_backend(monkeypatch):
    """use_backend("cpp") forces that backend for the rest of the test; monkeypatch then restores
    SPARSEMEM_BACKEND as it was (a run under SPARSEMEM_BACKEND=torch stays on torch)."""

    def force(backend: str) -> None:
        monkeypatch.setenv("SPARSEMEM_BACKEND", backend)

    return force
