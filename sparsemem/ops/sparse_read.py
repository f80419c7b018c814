"""SAM's read: softmax over K candidate slots only, and the read vectors (reference/sparse.py:
sparse_read_ref)."""

import torch
from torch import Tensor

from sparsemem._checks import Shapes, check_finite, check_indices
from sparsemem.ops._define import define_op
from sparsemem.reference import sparse_read_ref


def _sparse_read_fake(memory: Tensor, indices: Tensor, keys: Tensor, strengths: Tensor) -> tuple[Tensor, Tensor]:
    return keys.new_empty(indices.shape), torch.empty_like(keys)


_sparse_read = define_op(
    "sparse_read",
    "(Tensor memory, Tensor indices, Tensor keys, Tensor strengths) -> (Tensor, Tensor)",
    sparse_read_ref,
    _sparse_read_fake,
    differentiable=(0, 2, 3),
    stem="sparse_read",
)


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
