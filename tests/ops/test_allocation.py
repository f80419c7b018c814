"""allocation_weights' compiled CPU kernel (csrc/cpu/allocation.cpp) at usages of exactly 0 and 1 and
ties, beyond tests/ops/test_dense_kernels.py's sizes."""

import pytest
import torch

import sparsemem as sm
from tests.conftest import reference_with_grads
from tests.tolerances import tolerance

CPP_UNAVAILABLE = sm.backends_for("allocation_weights", "cpu").unavailable.get("cpp")
pytestmark = pytest.mark.skipif(CPP_UNAVAILABLE is not None, reason=str(CPP_UNAVAILABLE))


def _usage_with_edges(dtype: torch.dtype, repeats: int = 1) -> torch.Tensor:
    """Rows with exact 0s, exact 1s and ties, in scrambled slot order, 9 slots repeated `repeats` times."""
    return torch.tensor(
        [
            [0.5, 0.0, 1.0, 0.25, 0.0, 0.75, 1.0, 0.5, 0.0],  # ties at 0, 1 and 0.5
            [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],  # all full: nothing to allocate
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # all free: the first slot gets everything
            [0.9, 0.3, 0.3, 1.0, 0.0, 0.6, 0.3, 0.2, 0.7],
        ],
        dtype=dtype,
    ).repeat(1, repeats)


@pytest.mark.parametrize("repeats", [1, 9], ids=["insertion-sorted", "radix-sorted"])  # N = 9, 81
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_allocation_at_zero_one_and_ties(dtype, repeats, nan_poisoned):
    """Both of the kernel's sorts: insertion up to 64 slots, radix above."""
    usage = _usage_with_edges(dtype, repeats)
    allocation = torch.ops.sparsemem.ext_allocation_weights(usage)
    seed = torch.randn(usage.shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
    (grad,) = torch.ops.sparsemem.ext_allocation_weights_backward(seed, usage, allocation)
    (want_allocation,), (want_grad,) = reference_with_grads("allocation_weights", (usage,), [seed])
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(allocation.double(), want_allocation, **tolerance(dtype))
    torch.testing.assert_close(grad.double(), want_grad, **tolerance(dtype))
    # ties go to the lowest index: in row 2 (all free) slot 0 gets the whole allocation
    assert allocation[2].tolist() == [1.0] + [0.0] * (9 * repeats - 1)


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
