"""journaled_write: sparse_write done in place on a store of flat rows, returning the rows it
overwrote (reference/sparse.py: journaled_write_ref), and its backward on a row-keyed gradient
buffer. The building block of the sparse memory's journal, not a public op (not in sparsemem.ops).

Both mutate their inputs, and torch forbids an autograd formula on a mutating op: they are
registered as torch.ops.sparsemem.journaled_write / journaled_write_backward (mutates_args, with
fakes, checked by opcheck), and the caller differentiates the write in its own autograd Function
with journaled_write_backward. Eager calls run the backend's kernel directly, as define_op's ops do
(the custom op's dispatch costs more than a step's write); inside torch.compile the registered op.
"""

import importlib
from collections.abc import Callable

import torch
from torch import Tensor

from sparsemem import _backends
from sparsemem._checks import Shapes, check_finite, check_indices
from sparsemem.ops._define import declare_op
from sparsemem.reference import journaled_write_ref

NAME = "journaled_write"
SCHEMA = (
    "(Tensor(a!) rows, Tensor(b!) written, Tensor initial_word, Tensor keys, Tensor weights, Tensor add, "
    "Tensor erase_rows) -> (Tensor, Tensor, Tensor)"
)
BACKWARD_SCHEMA = (
    "(Tensor(a!) grad_buffer, Tensor positions, Tensor first, Tensor old, Tensor weights, Tensor add, "
    "Tensor erase_rows, Tensor new) -> (Tensor, Tensor)"
)


def _torch_forward(*inputs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    with torch.no_grad():
        return journaled_write_ref(*inputs)


def _triton_forward(*inputs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    # imported on the first call, as triton_kernel does: `import sparsemem` never imports triton
    return importlib.import_module("sparsemem.kernels.journaled_write").journaled_write_forward(*inputs)


def _torch_write_backward(grads, inputs, outputs):
    """sparse_write's backward in torch, written out: of new = old * keep + w add^T,
    grad old = g keep, grad w_j = g_j . add, grad add = sum_j w_j g_j (the products and sums
    autograd forms for sparse_write_ref). Not sparse_write's torch backend: that differentiates by
    torch.func.vjp, which cannot run inside the dispatch modes (opcheck's, torch.compile's) around
    a custom op's body."""
    (grad_new,) = grads
    old, weights, add, erase_rows = inputs
    keep = (~erase_rows).to(old.dtype).unsqueeze(-1)
    grad_weights = (grad_new * add.unsqueeze(1)).sum(-1)
    return grad_new * keep, grad_weights, (grad_new * weights.unsqueeze(-1)).sum(1)


def composed_backward(write_backward: Callable) -> Callable:
    """journaled_write_backward from a backend's sparse_write backward, in three steps (see
    journaled_write_backward): take the written rows' gradient at positions (once per distinct
    row, where first is True) and zero it there, differentiate through the write, add the old
    rows' gradient back at the same positions. The cpp backend fuses them in one kernel."""

    def backward(grad_buffer, positions, first, old, weights, add, erase_rows, new):
        flat = positions.reshape(-1)
        grad_new = (grad_buffer[flat] * first.reshape(-1, 1)).view_as(new)
        grad_buffer.index_fill_(0, flat, 0)
        grad_old, grad_weights, grad_add = write_backward((grad_new,), (old, weights, add, erase_rows), (new,))[:3]
        grad_buffer.index_add_(0, flat, grad_old.reshape(-1, old.shape[-1]))
        return grad_weights, grad_add

    return backward


def _fused_backward(grad_buffer, positions, first, old, weights, add, erase_rows, new):
    return torch.ops.sparsemem.ext_journaled_write_backward.default(
        grad_buffer, positions, first, weights, add, erase_rows
    )


def _register() -> None:
    """Per backend: the in-place forward, and the backward fused (cpp) or composed around that
    backend's sparse_write backward."""
    declare_op(NAME, "journaled_write", SCHEMA, differentiable=(4, 5), public=False)
    importlib.import_module("sparsemem.ops.sparse_write")  # its kernels compose the backward
    write = _backends.implementations("sparse_write")
    _backends.register(NAME, "torch", _backends.Kernel(_torch_forward, composed_backward(_torch_write_backward)))
    _backends.register(NAME, "triton", _backends.Kernel(_triton_forward, composed_backward(write["triton"].backward)))
    if _backends.extension() is None or not hasattr(torch.ops.sparsemem, f"ext_{NAME}"):
        return
    forward = torch.ops.sparsemem.ext_journaled_write.default
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    for backend, dispatch_key in (("cpp", "CPU"), ("cuda", "CUDA")):
        if not has_kernel(f"sparsemem::ext_{NAME}", dispatch_key) or backend not in write:
            continue
        fused = has_kernel(f"sparsemem::ext_{NAME}_backward", dispatch_key)
        backward = _fused_backward if fused else composed_backward(write[backend].backward)
        _backends.register(NAME, backend, _backends.Kernel(forward, backward))


_register()


def _run_forward(rows, written, initial_word, keys, weights, add, erase_rows):
    return _backends.kernel(NAME, rows.device).forward(rows, written, initial_word, keys, weights, add, erase_rows)


def _run_backward(grad_buffer, positions, first, old, weights, add, erase_rows, new):
    kernel = _backends.kernel(NAME, grad_buffer.device)
    return kernel.backward(grad_buffer, positions, first, old, weights, add, erase_rows, new)


_forward_op = torch.library.custom_op(
    f"sparsemem::{NAME}", _run_forward, mutates_args=("rows", "written"), schema=SCHEMA
)
_backward_op = torch.library.custom_op(
    f"sparsemem::{NAME}_backward", _run_backward, mutates_args=("grad_buffer",), schema=BACKWARD_SCHEMA
)


@_forward_op.register_fake
def _(rows, written, initial_word, keys, weights, add, erase_rows):
    shape = (*keys.shape, rows.shape[-1])
    return rows.new_empty(shape), rows.new_empty(shape), written.new_empty(keys.shape)


@_backward_op.register_fake
def _(grad_buffer, positions, first, old, weights, add, erase_rows, new):
    return weights.new_empty(weights.shape), add.new_empty(add.shape)


def journaled_write(
    rows: Tensor, written: Tensor, initial_word: Tensor, keys: Tensor, weights: Tensor, add: Tensor, erase_rows: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """sparse_write in place: rows [M, W] (a store of flat rows, written in place), written [M] bool
    (set at every key), initial_word [W] (what an unwritten row reads as), keys [B, J] int64 in
    [0, M), weights [B, J], add [B, W], erase_rows [B, J] bool -> (old rows [B, J, W], new rows
    [B, J, W] = old * (1 - erase) + weights add^T, fresh [B, J] bool: the first entry of each key
    that was unwritten). Keys of different batch rows must differ, and a key repeated within one
    must carry identical weights and erase_rows (they store one row). No autograd: differentiate
    it with journaled_write_backward."""
    shapes = Shapes().check("rows", rows, "M W").check("written", written, "M", kind="bool")
    shapes.check("initial_word", initial_word, "W").check("keys", keys, "B J", kind="index")
    shapes.check("weights", weights, "B J").check("add", add, "B W").check("erase_rows", erase_rows, "B J", kind="bool")
    check_indices("keys", keys, shapes.size("M"))
    check_finite("weights", weights)
    check_finite("add", add)
    if torch.compiler.is_compiling():
        return _forward_op(rows, written, initial_word, keys, weights, add, erase_rows)
    return _run_forward(rows, written, initial_word, keys, weights, add, erase_rows)


def journaled_write_backward(
    grad_buffer: Tensor,
    positions: Tensor,
    first: Tensor,
    old: Tensor,
    weights: Tensor,
    add: Tensor,
    erase_rows: Tensor,
    new: Tensor,
) -> tuple[Tensor, Tensor]:
    """The backward of one journaled_write, run by the backend that runs on grad_buffer's device.

    grad_buffer [P, W]: gradients of rows, updated in place; positions [B, J] int64: the row of
    grad_buffer that holds each written entry's gradient; first [B, J] bool: True at one entry per
    distinct position; old, weights, add, erase_rows, new: the write's inputs and outputs.
    In order: g = grad_buffer[positions] * first, the gradient of the new rows; grad_buffer[positions]
    = 0 (the old rows did not reach what came after the write); the write's backward of g; the old
    rows' gradient added into grad_buffer[positions]. -> (grad weights [B, J], grad add [B, W]).
    """
    if torch.compiler.is_compiling():
        return _backward_op(grad_buffer, positions, first, old, weights, add, erase_rows, new)
    return _run_backward(grad_buffer, positions, first, old, weights, add, erase_rows, new)
