"""journaled_write's registered ops (torch.ops.sparsemem.journaled_write and journaled_write_backward,
which mutate their inputs and so have no autograd formula) under torch.library.opcheck on every
backend that runs here, and each backend against the torch one. The journal around them (the sparse
memory's write, bit for bit against gather + sparse_write + scatter) is tests/memory/test_journaled_write.py."""

import pytest
import torch

from sparsemem.ops.journaled_write import journaled_write, journaled_write_backward
from sparsemem.testing import op_inputs
from tests.conftest import cpu_backends
from tests.tolerances import tolerance

BACKENDS = cpu_backends("journaled_write")


def forward_inputs(dtype: torch.dtype) -> tuple:
    return op_inputs("journaled_write", dtype, B=3, N=11, W=5, R=3)


def backward_inputs(dtype: torch.dtype) -> tuple:
    """A gradient buffer with a row per store row, positions = the keys (one entry per row)."""
    rows, written, initial_word, keys, weights, add, erase_rows = forward_inputs(dtype)
    old, new, _ = journaled_write(rows, written, initial_word, keys, weights, add, erase_rows)
    grad_buffer = torch.randn(rows.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    first = torch.ones(keys.shape, dtype=torch.bool)
    first[:, -1] = False  # an entry whose row another entry already took
    return grad_buffer, keys, first, old, weights, add, erase_rows, new


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_opcheck(backend, use_backend):
    use_backend(backend)
    torch.library.opcheck(torch.ops.sparsemem.journaled_write.default, forward_inputs(torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_opcheck(backend, use_backend):
    use_backend(backend)
    torch.library.opcheck(torch.ops.sparsemem.journaled_write_backward.default, backward_inputs(torch.float64))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_matches_torch_backend(backend, dtype, use_backend):
    results = []
    for name in ("torch", backend):
        use_backend(name)
        inputs = forward_inputs(dtype)
        outputs = journaled_write(*inputs)
        grad_inputs = backward_inputs(dtype)
        grads = journaled_write_backward(*grad_inputs)
        # what each mutates: the store's rows and written marks, the gradient buffer
        results.append((*outputs, inputs[0], inputs[1], *grads, grad_inputs[0]))
    for got, want in zip(results[1], results[0], strict=True):
        assert got.dtype == want.dtype
        if got.is_floating_point():
            torch.testing.assert_close(got, want, **tolerance(dtype))
        else:
            assert torch.equal(got, want)
