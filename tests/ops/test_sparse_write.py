"""The fast kernels of sparse_write beyond the generic op tests (tests/ops/test_registered_ops.py):
J in {1, 33} (SAM's write set at R = 4, K = 8) and outputs that start as NaN."""

import pytest
import torch

import sparsemem as sm
from sparsemem import reference
from tests.conftest import cpu_backends, run_backward
from tests.tolerances import tolerance

BACKENDS = [backend for backend in cpu_backends("sparse_write") if backend != "torch"]
DTYPES = [torch.float64, torch.float32]

if not BACKENDS:
    pytest.skip("no fast backend implements sparse_write here", allow_module_level=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("J", [1, 33])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_write_matches_reference(backend, J, dtype, use_backend, nan_poisoned):
    use_backend(backend)
    g = torch.Generator().manual_seed(J)
    rows = torch.randn(3, J, 7, generator=g, dtype=dtype, requires_grad=True)
    weights = torch.rand(3, J, generator=g, dtype=dtype, requires_grad=True)
    add = torch.randn(3, 7, generator=g, dtype=dtype, requires_grad=True)
    erase_rows = torch.rand(3, J, generator=g) < 0.3
    want = reference.sparse_write_ref(rows, weights, add, erase_rows)
    got = sm.ops.sparse_write(rows, weights, add, erase_rows)
    torch.testing.assert_close(got, want, **tolerance(dtype))
    got_grads, seeds = run_backward((got,), (rows, weights, add))
    want_grads = torch.autograd.grad(want, (rows, weights, add), seeds)
    for g_, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g_, w, **tolerance(dtype))
