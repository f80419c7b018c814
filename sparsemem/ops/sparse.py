"""Sparse access (SAM): top-K content search, reads over K candidates, writes on gathered rows."""

import torch
from torch import Tensor

from sparsemem import _backends
from sparsemem._checks import Shapes, check_finite, check_indices
from sparsemem.ops._define import define_op, triton_kernel
from sparsemem.reference import sparse_read_ref, sparse_write_ref, topk_content_ref


def _topk_content_fake(memory: Tensor, keys: Tensor, k: int) -> tuple[Tensor, Tensor]:
    shape = (keys.shape[0], keys.shape[1], k)
    return keys.new_empty(shape), keys.new_empty(shape, dtype=torch.int64)


_topk_content = define_op(
    "topk_content",
    "(Tensor memory, Tensor keys, SymInt k) -> (Tensor, Tensor)",
    topk_content_ref,
    _topk_content_fake,
    differentiable=(0, 1),
)


_backends.register("topk_content", "triton", triton_kernel("sparse", "topk_content", differentiable=(0, 1)))


def topk_content(memory: Tensor, keys: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The K most similar slots per key: memory [B, N, W], keys [B, R, W] -> (scores [B, R, K], indices [B, R, K]).

    Scores are cosine similarities, sorted descending; indices are int64 slot ids. Equal scores:
    the cpp and triton kernels put the lower slot first; the torch backend keeps torch.topk's order,
    which torch does not specify. The memory gradient is dense [B, N, W], non-zero on the K rows per
    head only.
    """
    shapes = Shapes().check("memory", memory, "B N W").check("keys", keys, "B R W")
    if not 1 <= k <= shapes.size("N"):
        raise ValueError(f"k must be in [1, N={shapes.size('N')}]; got k={k}")
    check_finite("memory", memory, state=True)
    check_finite("keys", keys)
    return _topk_content(memory, keys, k)


def _sparse_read_fake(memory: Tensor, indices: Tensor, keys: Tensor, strengths: Tensor) -> tuple[Tensor, Tensor]:
    return keys.new_empty(indices.shape), torch.empty_like(keys)


_sparse_read = define_op(
    "sparse_read",
    "(Tensor memory, Tensor indices, Tensor keys, Tensor strengths) -> (Tensor, Tensor)",
    sparse_read_ref,
    _sparse_read_fake,
    differentiable=(0, 2, 3),
)


_backends.register("sparse_read", "triton", triton_kernel("sparse", "sparse_read", differentiable=(0, 2, 3)))


def sparse_read(memory: Tensor, indices: Tensor, keys: Tensor, strengths: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax over K candidate slots only: memory [B, N, W], indices [B, R, K], keys [B, R, W],
    strengths [B, R] -> (weights [B, R, K], reads [B, R, W])."""
    shapes = Shapes().check("memory", memory, "B N W").check("indices", indices, "B R K", kind="index")
    shapes.check("keys", keys, "B R W").check("strengths", strengths, "B R")
    check_indices("indices", indices, shapes.size("N"))
    check_finite("memory", memory, state=True)
    check_finite("keys", keys)
    check_finite("strengths", strengths)
    return _sparse_read(memory, indices, keys, strengths)


_sparse_write = define_op(
    "sparse_write",
    "(Tensor rows, Tensor weights, Tensor add, Tensor erase_rows) -> Tensor",
    sparse_write_ref,
    lambda rows, weights, add, erase_rows: torch.empty_like(rows),
    differentiable=(0, 1, 2),
)


_backends.register("sparse_write", "triton", triton_kernel("sparse", "sparse_write", differentiable=(0, 1, 2)))


def sparse_write(rows: Tensor, weights: Tensor, add: Tensor, erase_rows: Tensor) -> Tensor:
    """Write on J gathered rows: rows [B, J, W], weights [B, J], add [B, W], erase_rows [B, J] bool
    -> new rows [B, J, W] = rows * (1 - erase) + weights add^T."""
    shapes = Shapes().check("rows", rows, "B J W").check("weights", weights, "B J")
    shapes.check("add", add, "B W").check("erase_rows", erase_rows, "B J", kind="bool")
    check_finite("rows", rows, state=True)
    check_finite("weights", weights)
    check_finite("add", add)
    return _sparse_write(rows, weights, add, erase_rows)
