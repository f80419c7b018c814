"""SAM's write on J gathered rows, functional (reference/sparse.py: sparse_write_ref); its in-place
form on a row store is sparsemem.ops.journaled_write."""

import torch
from torch import Tensor

from sparsemem._checks import Shapes, check_finite
from sparsemem.ops._define import define_op
from sparsemem.reference import sparse_write_ref

_sparse_write = define_op(
    "sparse_write",
    "(Tensor rows, Tensor weights, Tensor add, Tensor erase_rows) -> Tensor",
    sparse_write_ref,
    lambda rows, weights, add, erase_rows: torch.empty_like(rows),
    differentiable=(0, 1, 2),
    stem="sparse_write",
)


def sparse_write(rows: Tensor, weights: Tensor, add: Tensor, erase_rows: Tensor) -> Tensor:
    """Write on J gathered rows: rows [B, J, W], weights [B, J], add [B, W], erase_rows [B, J] bool
    -> new rows [B, J, W] = rows * (1 - erase) + weights add^T."""
    shapes = Shapes().check("rows", rows, "B J W").check("weights", weights, "B J")
    shapes.check("add", add, "B W").check("erase_rows", erase_rows, "B J", kind="bool")
    check_finite("rows", rows, state=True)
    check_finite("weights", weights)
    check_finite("add", add)
    return _sparse_write(rows, weights, add, erase_rows)
