"""Sparse access (SAM): top-K content search, reads over K candidates, writes on gathered rows.

journaled_write is sparse_write done in place on a memory's row store; it is the building block
of memory/_lazy.py's JournaledMemory.write, not an op of its own (no autograd: it mutates).
"""

import importlib
from collections.abc import Callable

import torch
from torch import Tensor

from sparsemem import _backends
from sparsemem._checks import Shapes, check_finite, check_indices
from sparsemem.ops._define import define_op, triton_kernel
from sparsemem.reference import journaled_write_ref, sparse_read_ref, sparse_write_ref, topk_content_ref


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


def _journaled_write_torch(*inputs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    with torch.no_grad():
        return journaled_write_ref(*inputs)


def _journaled_write_triton(*inputs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    # imported on the first call, as triton_kernel does: `import sparsemem` never imports triton
    return importlib.import_module("sparsemem.kernels.sparse").journaled_write_forward(*inputs)


def composed_backward(write_backward: Callable) -> Callable:
    """journaled_write's backward from a backend's sparse_write backward, three steps:

    backward(grad_buffer [P, W] (in place), positions [B, J], first [B, J], old, weights, add,
    erase_rows, new) -> (grad weights [B, J], grad add [B, W]): the written rows' gradient is
    taken from the row-keyed buffer (once per distinct key, where first is True) and zeroed
    there, differentiated through the write, and the old rows' gradient added back at the same
    positions. The cpp backend does the same in one kernel (ext_journaled_write_backward).
    """

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


def _register_journaled_write() -> None:
    """journaled_write per backend: its in-place forward and a backward on the journal's gradient
    buffer, fused on the cpp backend, else composed around that backend's sparse_write backward."""
    write = _backends._KERNELS["sparse_write"]
    torch_backward = composed_backward(write["torch"].backward)
    _backends.register("journaled_write", "torch", _backends.Kernel(_journaled_write_torch, torch_backward))
    triton_backward = composed_backward(write["triton"].backward)
    _backends.register("journaled_write", "triton", _backends.Kernel(_journaled_write_triton, triton_backward))
    if _backends.extension() is None or not hasattr(torch.ops.sparsemem, "ext_journaled_write"):
        return
    forward = torch.ops.sparsemem.ext_journaled_write.default
    for backend, dispatch_key in (("cpp", "CPU"), ("cuda", "CUDA")):
        has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
        if not has_kernel("sparsemem::ext_journaled_write", dispatch_key) or backend not in write:
            continue
        fused = has_kernel("sparsemem::ext_journaled_write_backward", dispatch_key)
        backward = _fused_backward if fused else composed_backward(write[backend].backward)
        _backends.register("journaled_write", backend, _backends.Kernel(forward, backward))


_register_journaled_write()


def journaled_write(
    rows: Tensor, written: Tensor, initial_word: Tensor, keys: Tensor, weights: Tensor, add: Tensor, erase_rows: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """sparse_write in place: rows [M, W] (a store of flat rows, written in place), written [M] bool
    (set at every key), initial_word [W] (what an unwritten row reads as), keys [B, J] int64 in
    [0, M), weights [B, J], add [B, W], erase_rows [B, J] bool -> (old rows [B, J, W], new rows
    [B, J, W] = old * (1 - erase) + weights add^T, fresh [B, J] bool: the first entry of each key
    that was unwritten). Keys of different batch rows must differ, and
    a key repeated within one must carry identical weights and erase_rows (they store one row).
    No autograd: JournaledMemory.write differentiates it with the kernel's backward."""
    shapes = Shapes().check("rows", rows, "M W").check("written", written, "M", kind="bool")
    shapes.check("initial_word", initial_word, "W").check("keys", keys, "B J", kind="index")
    shapes.check("weights", weights, "B J").check("add", add, "B W").check("erase_rows", erase_rows, "B J", kind="bool")
    check_indices("keys", keys, shapes.size("M"))
    check_finite("weights", weights)
    check_finite("add", add)
    return _backends.kernel("journaled_write", rows.device).forward(
        rows, written, initial_word, keys, weights, add, erase_rows
    )
