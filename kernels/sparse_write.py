"""sparse_write: new = rows * (1 - erase) + w add^T on J gathered rows (sparsemem.ops.sparse_write)."""

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import accumulator_dtype, block_n, contiguous, pow2


@triton.jit
def sparse_write_kernel(
    rows_ptr,
    weights_ptr,
    add_ptr,
    erase_ptr,
    out_ptr,
    J,
    W,
    BLOCK_J: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    # One program per (b, block of rows): new = rows * (1 - erase) + w add^T on a [BLOCK_J, BLOCK_W] tile.
    b = tl.program_id(0)
    acc = tl.float64 if rows_ptr.dtype.element_ty == tl.float64 else tl.float32
    j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    w = tl.arange(0, BLOCK_W)
    j_ok = j < J
    w_ok = w < W
    at = (b * J + j[:, None]) * W + w[None, :]
    mask = j_ok[:, None] & w_ok[None, :]
    rows = tl.load(rows_ptr + at, mask=mask, other=0.0).to(acc)
    weight = tl.load(weights_ptr + b * J + j, mask=j_ok, other=0.0).to(acc)
    erase = tl.load(erase_ptr + b * J + j, mask=j_ok, other=0) != 0
    add = tl.load(add_ptr + b * W + w, mask=w_ok, other=0.0).to(acc)
    kept = tl.where(erase[:, None], 0.0, rows)
    tl.store(out_ptr + at, kept + weight[:, None] * add[None, :], mask=mask)


def sparse_write_forward(rows: Tensor, weights: Tensor, add: Tensor, erase_rows: Tensor) -> Tensor:
    rows, weights, add, erase_rows = contiguous(rows, weights, add, erase_rows)
    B, J, W = rows.shape
    out = torch.empty_like(rows)
    tile = block_n(J, W)
    sparse_write_kernel[(B, triton.cdiv(J, tile))](
        rows, weights, add, erase_rows.view(torch.uint8), out, J, W, BLOCK_J=tile, BLOCK_W=pow2(W)
    )
    return out


@triton.jit
def sparse_write_backward_kernel(
    grad_ptr,
    weights_ptr,
    add_ptr,
    erase_ptr,
    grad_rows_ptr,
    grad_weights_ptr,
    grad_add_ptr,
    J,
    W,
    BLOCK_J: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    # One program per batch row, walking [BLOCK_J, BLOCK_W] tiles of G = d new:
    #   grad rows = G (1 - erase),  grad w_j = G_j . add,  grad add = sum_j w_j G_j (in registers).
    b = tl.program_id(0)
    acc = grad_add_ptr.dtype.element_ty
    w = tl.arange(0, BLOCK_W)
    w_ok = w < W
    add = tl.load(add_ptr + b * W + w, mask=w_ok, other=0.0).to(acc)
    grad_add = tl.zeros([BLOCK_W], acc)
    for start in range(0, J, BLOCK_J):
        j = start + tl.arange(0, BLOCK_J)
        j_ok = j < J
        at = (b * J + j[:, None]) * W + w[None, :]
        mask = j_ok[:, None] & w_ok[None, :]
        grad = tl.load(grad_ptr + at, mask=mask, other=0.0).to(acc)
        weight = tl.load(weights_ptr + b * J + j, mask=j_ok, other=0.0).to(acc)
        erase = tl.load(erase_ptr + b * J + j, mask=j_ok, other=0) != 0
        tl.store(grad_rows_ptr + at, tl.where(erase[:, None], 0.0, grad), mask=mask)
        tl.store(grad_weights_ptr + b * J + j, tl.sum(grad * add[None, :], 1), mask=j_ok)
        grad_add += tl.sum(weight[:, None] * grad, 0)
    tl.store(grad_add_ptr + b * W + w, grad_add, mask=w_ok)


def sparse_write_backward(grads: list[Tensor], inputs: list[Tensor], outputs: list[Tensor]) -> list[Tensor]:
    """grads [grad_new_rows] -> [grad_rows, grad_weights, grad_add]."""
    rows, weights, add, erase_rows = contiguous(*inputs)
    grad = grads[0].contiguous()
    B, J, W = rows.shape
    acc = accumulator_dtype(rows.dtype)
    grad_rows = torch.empty_like(rows)
    grad_weights = torch.empty(B, J, dtype=acc, device=rows.device)
    grad_add = torch.empty(B, W, dtype=acc, device=rows.device)
    sparse_write_backward_kernel[(B,)](
        grad, weights, add, erase_rows.view(torch.uint8), grad_rows, grad_weights, grad_add, J, W,
        BLOCK_J=block_n(J, W), BLOCK_W=pow2(W),
    )  # fmt: skip
    return [grad_rows, grad_weights.to(weights.dtype), grad_add.to(add.dtype)]
