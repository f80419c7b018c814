"""The compiled CPU kernels of the dense ops (csrc/cpu), called directly: odd sizes, every
output element written, allocation at usages of exactly 0 and 1 and ties, bfloat16.

test_registered_ops.py already runs every backend through the public ops; this file checks what
it cannot: sizes up to N = 4097 forward and backward, and outputs that a kernel fails to write.
"""

import pytest
import torch

from sparsemem import _backends, reference
from sparsemem.testing import DENSE_KERNEL_OPS, QUADRATIC_OPS, op_inputs
from tests.tolerances import tolerance

pytestmark = pytest.mark.skipif(_backends.availability()["cpp"] is not None, reason="C++ extension not built")


def _as_tuple(value):
    return value if isinstance(value, tuple) else (value,)


def _ext(op: str, *args):
    return _as_tuple(getattr(torch.ops.sparsemem, f"ext_{op}")(*args))


def _reference_with_grads(op: str, args: tuple, seeds: list) -> tuple[tuple, tuple]:
    leaves = [a.detach().double().requires_grad_(True) for a in args]
    outputs = _as_tuple(getattr(reference, f"{op}_ref")(*leaves))
    grads = torch.autograd.grad(outputs, leaves, [s.double() for s in seeds])
    return tuple(o.detach() for o in outputs), grads


@pytest.fixture
def poisoned_empty():
    """Every at::empty inside the kernels returns NaNs, so an element a kernel skips stays NaN.

    torch fills uninitialised memory (NaN for floats) when deterministic algorithms are on.
    """
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    assert torch.empty(4, dtype=torch.float32).isnan().all(), "the poisoning this test relies on is off"
    yield
    torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("N", [1, 7, 33, 1000, 4097])
@pytest.mark.parametrize("op", DENSE_KERNEL_OPS)
def test_kernels_write_every_element_and_match_reference(op, N, dtype, poisoned_empty):
    if op in QUADRATIC_OPS and N > 1000:
        pytest.skip("N x N links at N = 4097 cost seconds per call on 2 cores; N = 1000 is odd and multi-block")
    args = op_inputs(op, dtype, B=3, N=N, W=5, R=3, seed=N)
    outputs = _ext(op, *args)
    g = torch.Generator().manual_seed(1)
    seeds = [torch.randn(o.shape, generator=g, dtype=dtype) for o in outputs]
    grads = getattr(torch.ops.sparsemem, f"ext_{op}_backward")(*seeds, *args, *outputs)
    want_outputs, want_grads = _reference_with_grads(op, args, seeds)
    assert len(grads) == len(args)
    for got, want in zip([*outputs, *grads], [*want_outputs, *want_grads], strict=True):
        assert not got.isnan().any(), f"{op} left elements unwritten (NaN from the poisoned allocation)"
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, **tolerance(dtype, reduced_over=N))


def _usage_with_edges(dtype: torch.dtype) -> torch.Tensor:
    """Rows with exact 0s, exact 1s and ties, in scrambled slot order."""
    return torch.tensor(
        [
            [0.5, 0.0, 1.0, 0.25, 0.0, 0.75, 1.0, 0.5, 0.0],  # ties at 0, 1 and 0.5
            [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],  # all full: nothing to allocate
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # all free: the first slot gets everything
            [0.9, 0.3, 0.3, 1.0, 0.0, 0.6, 0.3, 0.2, 0.7],
        ],
        dtype=dtype,
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_allocation_at_zero_one_and_ties(dtype, poisoned_empty):
    usage = _usage_with_edges(dtype)
    allocation = torch.ops.sparsemem.ext_allocation_weights(usage)
    seed = torch.randn(usage.shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
    (grad,) = torch.ops.sparsemem.ext_allocation_weights_backward(seed, usage, allocation)
    (want_allocation,), (want_grad,) = _reference_with_grads("allocation_weights", (usage,), [seed])
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(allocation.double(), want_allocation, **tolerance(dtype))
    torch.testing.assert_close(grad.double(), want_grad, **tolerance(dtype))
    # ties go to the lowest index: in row 2 (all free) slot 0 gets the whole allocation
    assert allocation[2].tolist() == [1.0] + [0.0] * 8


def test_allocation_gradcheck_at_zero_and_one():
    # distinct usages (no ties: a tie is a kink where finite differences reorder the sort)
    usage = torch.tensor([[0.0, 0.6, 1.0, 0.2, 0.9], [1.0, 0.0, 0.3, 0.7, 0.5]], dtype=torch.float64)

    def allocation(u):
        return torch.ops.sparsemem.ext_allocation_weights(u)

    class Allocation(torch.autograd.Function):
        @staticmethod
        def forward(ctx, u):
            ctx.save_for_backward(u)
            return allocation(u)

        @staticmethod
        def backward(ctx, grad):
            (u,) = ctx.saved_tensors
            return torch.ops.sparsemem.ext_allocation_weights_backward(grad, u, allocation(u))[0]

    # finite differences of +-1e-6 keep 0 and 1 apart from every other usage, so the sort holds
    assert torch.autograd.gradcheck(Allocation.apply, (usage.requires_grad_(True),))


@pytest.mark.parametrize("op", DENSE_KERNEL_OPS)
def test_bfloat16_forward_and_backward(op):
    args64 = op_inputs(op, torch.float64, B=2, N=33, W=8, R=3)
    args16 = tuple(a.to(torch.bfloat16) for a in args64)
    outputs = _ext(op, *args16)
    seeds = [torch.randn(o.shape, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16) for o in outputs]
    grads = getattr(torch.ops.sparsemem, f"ext_{op}_backward")(*seeds, *args16, *outputs)
    # the float64 answer on the same bf16-rounded inputs: only the kernel's own rounding is measured
    want_outputs, want_grads = _reference_with_grads(op, args16, seeds)
    for got, want in zip([*outputs, *grads], [*want_outputs, *want_grads], strict=True):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double(), want, **tolerance(torch.bfloat16))


def test_content_read_matches_its_two_ops():
    memory, keys, strengths = op_inputs("content_read", torch.float64, B=3, N=4097, W=7, R=3)
    weights, reads = torch.ops.sparsemem.ext_content_read(memory, keys, strengths)
    torch.testing.assert_close(weights, torch.ops.sparsemem.ext_content_weights(memory, keys, strengths))
    torch.testing.assert_close(reads, torch.ops.sparsemem.ext_memory_read(memory, weights))
