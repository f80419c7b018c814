"""Writing to and reading from a dense memory."""

import torch
from torch import Tensor

from sparsemem._checks import Shapes, check_finite, check_range
from sparsemem.ops._define import define_op
from sparsemem.reference import memory_read_ref, memory_write_ref

_memory_write = define_op(
    "memory_write",
    "(Tensor memory, Tensor write_w, Tensor erase, Tensor add) -> Tensor",
    memory_write_ref,
    lambda memory, write_w, erase, add: torch.empty_like(memory),
    differentiable=(0, 1, 2, 3),
    stem="memory_rw",
)


def memory_write(memory: Tensor, write_w: Tensor, erase: Tensor, add: Tensor) -> Tensor:
    """M * (1 - w e^T) + w v^T: memory [B, N, W], write_w [B, N], erase [B, W], add [B, W] -> [B, N, W]."""
    shapes = Shapes().check("memory", memory, "B N W").check("write_w", write_w, "B N")
    shapes.check("erase", erase, "B W").check("add", add, "B W")
    check_finite("memory", memory, state=True)
    check_finite("write_w", write_w)
    check_range("erase", erase, 0.0, 1.0)
    check_finite("add", add)
    return _memory_write(memory, write_w, erase, add)


_memory_read = define_op(
    "memory_read",
    "(Tensor memory, Tensor read_w) -> Tensor",
    memory_read_ref,
    lambda memory, read_w: memory.new_empty(read_w.shape[0], read_w.shape[1], memory.shape[2]),
    differentiable=(0, 1),
    stem="memory_rw",
)


def memory_read(memory: Tensor, read_w: Tensor) -> Tensor:
    """M^T w^r: memory [B, N, W], read_w [B, R, N] -> reads [B, R, W]."""
    Shapes().check("memory", memory, "B N W").check("read_w", read_w, "B R N")
    check_finite("memory", memory, state=True)
    check_finite("read_w", read_w)
    return _memory_read(memory, read_w)
