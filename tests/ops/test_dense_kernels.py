"""The compiled CPU kernels of the dense ops (csrc/cpu), called directly: odd sizes, every
output element written, bfloat16 (op-specific cases: test_allocation.py, test_content.py).

test_registered_ops.py already runs every backend through the public ops; this file checks what
it cannot: sizes up to N = 4097 forward and backward, and outputs that a kernel fails to write.
"""

import pytest
import torch

import sparsemem as sm
from sparsemem.testing import DENSE_KERNEL_OPS, QUADRATIC_OPS, op_inputs
from tests.conftest import reference_with_grads
from tests.tolerances import tolerance

CPP_UNAVAILABLE = sm.backends_for("memory_read", "cpu").unavailable.get("cpp")
pytestmark = pytest.mark.skipif(CPP_UNAVAILABLE is not None, reason=str(CPP_UNAVAILABLE))


def _as_tuple(value):
    return value if isinstance(value, tuple) else (value,)


def _ext(op: str, *args):
    return _as_tuple(getattr(torch.ops.sparsemem, f"ext_{op}")(*args))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("N", [1, 7, 33, 1000, 4097])
@pytest.mark.parametrize("op", DENSE_KERNEL_OPS)
def test_kernels_write_every_element_and_match_reference(op, N, dtype, nan_poisoned):
    if op in QUADRATIC_OPS and N > 1000:
        pytest.skip("N x N links at N = 4097 cost seconds per call on 2 cores; N = 1000 is odd and multi-block")
    args = op_inputs(op, dtype, B=3, N=N, W=5, R=3, seed=N)
    outputs = _ext(op, *args)
    g = torch.Generator().manual_seed(1)
    seeds = [torch.randn(o.shape, generator=g, dtype=dtype) for o in outputs]
    grads = getattr(torch.ops.sparsemem, f"ext_{op}_backward")(*seeds, *args, *outputs)
    want_outputs, want_grads = reference_with_grads(op, args, seeds)
    assert len(grads) == len(args)
    for got, want in zip([*outputs, *grads], [*want_outputs, *want_grads], strict=True):
        assert not got.isnan().any(), f"{op} left elements unwritten (NaN from the poisoned allocation)"
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, **tolerance(dtype, reduced_over=N))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("R", [1, 2, 4, 5, 9])
@pytest.mark.parametrize("op", ["temporal_reads", "link_update_reads"])
def test_link_reads_match_reference_for_every_head_count(op, R, dtype, nan_poisoned):
    # up to 4 heads share one sweep over each link row (one kernel per head count), more take the
    # per-head path: every count of both, on a size whose rows end in a partial vector
    N = 37
    args = op_inputs(op, dtype, B=2, N=N, W=5, R=R, seed=R)
    outputs = _ext(op, *args)
    seeds = [torch.randn(o.shape, generator=torch.Generator().manual_seed(R), dtype=dtype) for o in outputs]
    grads = getattr(torch.ops.sparsemem, f"ext_{op}_backward")(*seeds, *args, *outputs)
    want_outputs, want_grads = reference_with_grads(op, args, seeds)
    for got, want in zip([*outputs, *grads], [*want_outputs, *want_grads], strict=True):
        assert not got.isnan().any(), f"{op} left elements unwritten (NaN from the poisoned allocation)"
        torch.testing.assert_close(got.double(), want, **tolerance(dtype, reduced_over=N))


@pytest.mark.parametrize("op", DENSE_KERNEL_OPS)
def test_bfloat16_forward_and_backward(op):
    args64 = op_inputs(op, torch.float64, B=2, N=33, W=8, R=3)
    args16 = tuple(a.to(torch.bfloat16) for a in args64)
    outputs = _ext(op, *args16)
    seeds = [torch.randn(o.shape, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16) for o in outputs]
    grads = getattr(torch.ops.sparsemem, f"ext_{op}_backward")(*seeds, *args16, *outputs)
    # the float64 answer on the same bf16-rounded inputs: only the kernel's own rounding is measured
    want_outputs, want_grads = reference_with_grads(op, args16, seeds)
    for got, want in zip([*outputs, *grads], [*want_outputs, *want_grads], strict=True):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double(), want, **tolerance(torch.bfloat16))
