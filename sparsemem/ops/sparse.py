"""Sparse access (SAM): top-K content search, reads over K candidates, writes on gathered rows."""

import importlib
from collections.abc import Sequence

import torch
from torch import Tensor

from sparsemem import _backends
from sparsemem._checks import Shapes, check_finite, check_indices
from sparsemem.ops._define import define_op
from sparsemem.reference import sparse_read_ref, sparse_write_ref, topk_content_ref


def _register_triton(name: str, differentiable: Sequence[int]) -> None:
    """Backend "triton" of `name`: <name>_forward / <name>_backward in sparsemem.kernels.sparse.

    The module (and triton) is imported on the first call, never by `import sparsemem`. The
    backward runs as the custom op sparsemem::triton_<name>_backward so that autograd tracing
    (opcheck, torch.compile) sees an op with a fake, not a kernel launch. It gets the grads of the
    float outputs and the tensor inputs (a non-tensor input such as topk's k comes last) and
    returns one grad per differentiable input.
    """

    def load():
        return importlib.import_module("sparsemem.kernels.sparse")

    def run_backward(grads: list[Tensor], inputs: list[Tensor], outputs: list[Tensor]) -> list[Tensor]:
        return getattr(load(), f"{name}_backward")(grads, inputs, outputs)

    schema = "(Tensor[] grads, Tensor[] inputs, Tensor[] outputs) -> Tensor[]"
    backward_op = torch.library.custom_op(
        f"sparsemem::triton_{name}_backward", run_backward, mutates_args=(), schema=schema
    )
    backward_op.register_fake(
        lambda grads, inputs, outputs: [inputs[i].new_empty(inputs[i].shape) for i in differentiable]
    )

    def forward(*inputs):
        return getattr(load(), f"{name}_forward")(*inputs)

    def backward(grads, inputs, outputs):
        float_grads = [g for g, out in zip(grads, outputs, strict=True) if out.is_floating_point()]
        tensors = [x for x in inputs if isinstance(x, Tensor)]
        input_grads: list[Tensor | None] = [None] * len(inputs)
        for position, grad in zip(differentiable, backward_op(float_grads, tensors, list(outputs)), strict=True):
            input_grads[position] = grad
        return tuple(input_grads)

    _backends.register(name, "triton", _backends.Kernel(forward, backward))


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


_register_triton("topk_content", differentiable=(0, 1))


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


_register_triton("sparse_read", differentiable=(0, 2, 3))


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


_register_triton("sparse_write", differentiable=(0, 1, 2))


def sparse_write(rows: Tensor, weights: Tensor, add: Tensor, erase_rows: Tensor) -> Tensor:
    """Write on J gathered rows: rows [B, J, W], weights [B, J], add [B, W], erase_rows [B, J] bool
    -> new rows [B, J, W] = rows * (1 - erase) + weights add^T."""
    shapes = Shapes().check("rows", rows, "B J W").check("weights", weights, "B J")
    shapes.check("add", add, "B W").check("erase_rows", erase_rows, "B J", kind="bool")
    check_finite("rows", rows, state=True)
    check_finite("weights", weights)
    check_finite("add", add)
    return _sparse_write(rows, weights, add, erase_rows)
