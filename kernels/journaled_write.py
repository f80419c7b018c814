"""journaled_write: sparse_write in place on a store of flat rows (sparsemem.ops.journaled_write).

One program per batch row gathers its J old rows (what the write overwrites, returned) before
sparse_write's kernel computes the new rows and torch stores them, so no entry reads a row another
entry of the call wrote.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import contiguous, pow2
from .sparse_write import sparse_write_forward


@triton.jit
def journaled_gather_kernel(
    rows_ptr,
    written_ptr,
    initial_ptr,
    keys_ptr,
    old_ptr,
    fresh_ptr,
    J,
    W,
    BLOCK_J: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    # One program per batch row, its J entries in one [BLOCK_J, BLOCK_W] tile: the old rows (the
    # initial word where a key is unwritten) and fresh (unwritten, and no earlier entry has the key,
    # from a [BLOCK_J, BLOCK_J] comparison of the keys: J is SAM's R*K + 1, tens of rows).
    b = tl.program_id(0)
    j = tl.arange(0, BLOCK_J)
    w = tl.arange(0, BLOCK_W)
    j_ok = j < J
    w_ok = w < W
    mask = j_ok[:, None] & w_ok[None, :]
    keys = tl.load(keys_ptr + b * J + j, mask=j_ok, other=0)
    was = tl.load(written_ptr + keys, mask=j_ok, other=0) != 0
    rows = tl.load(rows_ptr + keys[:, None] * W + w[None, :], mask=mask & was[:, None], other=0.0)
    initial = tl.load(initial_ptr + w, mask=w_ok, other=0.0)
    tl.store(old_ptr + (b * J + j[:, None]) * W + w[None, :], tl.where(was[:, None], rows, initial[None, :]), mask=mask)
    earlier = (keys[:, None] == keys[None, :]) & (j[None, :] < j[:, None])
    repeats = tl.sum(earlier.to(tl.int32), 1)
    fresh = (repeats == 0) & (was == 0)
    tl.store(fresh_ptr + b * J + j, fresh.to(tl.uint8), mask=j_ok)


def journaled_write_forward(
    rows: Tensor, written: Tensor, initial_word: Tensor, keys: Tensor, weights: Tensor, add: Tensor, erase_rows: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """sparse_write in place on the store rows [M, W] (see sparsemem.ops.journaled_write): the
    gather kernel, sparse_write's kernel on the old rows, then the new rows stored at the keys (a
    repeated key's entries carry the same row)."""
    keys, initial_word = contiguous(keys, initial_word)
    B, J = keys.shape
    W = rows.shape[1]
    old = torch.empty(B, J, W, dtype=rows.dtype, device=rows.device)
    fresh = torch.empty(B, J, dtype=torch.bool, device=rows.device)
    journaled_gather_kernel[(B,)](
        rows, written.view(torch.uint8), initial_word, keys, old, fresh.view(torch.uint8), J, W,
        BLOCK_J=pow2(J), BLOCK_W=pow2(W),
    )  # fmt: skip
    new = sparse_write_forward(old, weights, add, erase_rows)
    flat = keys.view(-1)
    rows[flat] = new.view(-1, W)
    written[flat] = True
    return old, new, fresh
