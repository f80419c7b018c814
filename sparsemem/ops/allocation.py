"""DNC allocation: sort usage, exclusive cumulative product of the sorted usages, scatter back."""

from torch import Tensor

from sparsemem._checks import Shapes, check_range
from sparsemem.ops._define import define_op
from sparsemem.reference import allocation_weights_ref

_allocation_weights = define_op(
    "allocation_weights",
    "(Tensor usage) -> Tensor",
    allocation_weights_ref,
    lambda usage: usage.new_empty(usage.shape),
    differentiable=(0,),
    stem="allocation",
)


def allocation_weights(usage: Tensor) -> Tensor:
    """a[phi_j] = (1 - u[phi_j]) prod_{i<j} u[phi_i]: usage [B, N] -> [B, N].

    Ties in usage are broken by slot index; the gradient flows through the
    product, not through the sort. Usage must lie in [0, 1].
    """
    Shapes().check("usage", usage, "B N")
    check_range("usage", usage, 0.0, 1.0)
    return _allocation_weights(usage)
