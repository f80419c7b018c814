"""Triton kernels beyond the generic op tests: multi-tile paths, hard usages, NaN-poisoned outputs,
and a compile of every kernel for a real GPU target (sm_90) without a GPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsemem import _backends, reference
from sparsemem.testing import op_inputs
from tests.kernels.inputs import hard_usages
from tests.tolerances import tolerance

if _backends.availability()["triton"] is not None:
    pytest.skip(_backends.availability()["triton"], allow_module_level=True)

from sparsemem.kernels import allocation, content

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def nan_poisoned(monkeypatch):
    """Every float buffer the kernels allocate starts as NaN, so an element no program writes shows."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(tensor):
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))


# the interpreter runs a custom scan element by element (~N python steps a row), so the big
# sizes run once, in float64
@pytest.mark.parametrize(
    ("N", "block", "dtype"),
    [(N, 16, dtype) for N in (1, 7, 33) for dtype in (torch.float64, torch.float32)]
    + [(1000, 64, torch.float64), (4097, 1024, torch.float64)],
)
def test_allocation_multi_tile_with_zeros_ones_and_ties(N, block, dtype, nan_poisoned):
    usage = hard_usages(3, N, dtype).requires_grad_(True)
    seed = torch.randn(3, N, dtype=dtype)
    got = allocation.allocation_weights_forward(usage.detach(), block=block)
    want = reference.allocation_weights_ref(usage)
    torch.testing.assert_close(got, want.detach(), **tolerance(dtype))
    (grad,) = allocation.allocation_weights_backward([seed], [usage.detach()], [got], block=block)
    (want_grad,) = torch.autograd.grad(want, usage, seed)
    assert grad.isfinite().all()
    torch.testing.assert_close(grad, want_grad, **tolerance(dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_content_read_many_splits(dtype, nan_poisoned):
    memory, keys, strengths = op_inputs("content_read", dtype, B=3, N=4097, W=5, R=3)
    weights, reads = content.content_read_forward(memory, keys, strengths * 10)
    want_weights, want_reads = reference.content_read_ref(memory, keys, strengths * 10)
    torch.testing.assert_close(weights, want_weights, **tolerance(dtype))
    torch.testing.assert_close(reads, want_reads, **tolerance(dtype))


def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run(
        [sys.executable, "-m", "tests.kernels.compile_triton", "float32,bfloat16"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "compiled" in result.stdout
