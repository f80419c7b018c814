"""The fast kernels of sparse_read beyond the generic op tests (tests/ops/test_registered_ops.py):
odd sizes with K in {1, 8}, repeated slots, K = N against the dense content read, gradcheck,
and outputs that start as NaN."""

import pytest
import torch

import sparsemem as sm
from sparsemem import reference
from sparsemem.testing import op_inputs
from tests.conftest import cpu_backends, run_backward
from tests.tolerances import tolerance

BACKENDS = [backend for backend in cpu_backends("sparse_read") if backend != "torch"]
DTYPES = [torch.float64, torch.float32]

if not BACKENDS:
    pytest.skip("no fast backend implements sparse_read here", allow_module_level=True)


def sparse_read_inputs(B, N, W, R, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    memory = torch.randn(B, N, W, generator=g, dtype=dtype)
    # repeated slots within and across heads: their gradients must add up
    indices = torch.randint(0, N, (B, R, k), generator=g)
    keys = torch.randn(B, R, W, generator=g, dtype=dtype)
    strengths = torch.rand(B, R, generator=g, dtype=dtype) * 10
    return memory, indices, keys, strengths


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 8])
@pytest.mark.parametrize("N", [11, 1000])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_read_matches_reference(backend, N, k, dtype, use_backend, nan_poisoned):
    use_backend(backend)
    memory, indices, keys, strengths = sparse_read_inputs(3, N, 7, 3, k, dtype)
    leaves = [t.requires_grad_(True) for t in (memory, keys, strengths)]
    want = reference.sparse_read_ref(memory, indices, keys, strengths)
    got = sm.ops.sparse_read(memory, indices, keys, strengths)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **tolerance(dtype))
    got_grads, seeds = run_backward(got, leaves)
    want_grads = torch.autograd.grad(want, leaves, seeds)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_read_over_every_slot_equals_content_read(backend, dtype, use_backend):
    use_backend(backend)
    memory, keys, strengths = op_inputs("content_read", dtype, B=3, N=13, W=5, R=3)
    every_slot = torch.arange(13).expand(3, 3, 13)
    got = sm.ops.sparse_read(memory, every_slot, keys, strengths)
    for g, w in zip(got, reference.content_read_ref(memory, keys, strengths), strict=True):
        torch.testing.assert_close(g, w, **tolerance(dtype))


@pytest.mark.parametrize("k", [1, 8])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_read_gradcheck(backend, k, use_backend):
    use_backend(backend)
    memory, indices, keys, strengths = sparse_read_inputs(2, 9, 4, 3, k, torch.float64, seed=3)
    args = (memory.requires_grad_(True), indices, keys.requires_grad_(True), strengths.requires_grad_(True))
    assert torch.autograd.gradcheck(sm.ops.sparse_read, args, fast_mode=backend == "triton")
