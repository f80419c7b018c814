"""DNC temporal links: link and precedence update, and reads through the links, on [BLOCK_I, BLOCK_J] tiles.

Every kernel reads each N x N matrix it needs once and writes each one it makes once; the fused
link_update_reads (one DNC step's link work) reads L once and writes L' once, forward and backward.
Sums over rows (over i) cross tiles: each row block writes its partial and torch adds the
[B, N / BLOCK_I, ...] partials, which is deterministic and small next to N x N.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import TILE_ELEMENTS, accumulator_dtype, contiguous, pow2, tile_at

BLOCK = 32


# --- one tile's work, the same in every kernel that does it (so the same bits everywhere)


@triton.jit
def _link_tile(link_ptr, write_w_ptr, precedence_ptr, b, N, i, j, acc: tl.constexpr):
    # Tile (i, j) of batch row b's L, what an update of it reads: -> (offsets and mask of the
    # tile, L [BLOCK_I, BLOCK_J], w_j and p_j [BLOCK_J]); 0 past N.
    at, mask = tile_at(b, i, N, j, N)
    link = tl.load(link_ptr + at, mask=mask, other=0.0).to(acc)
    w_j = tl.load(write_w_ptr + b * N + j, mask=j < N, other=0.0).to(acc)
    p_j = tl.load(precedence_ptr + b * N + j, mask=j < N, other=0.0).to(acc)
    return at, mask, link, w_j, p_j


@triton.jit
def _updated_link(link, w_i, w_j, p_j, i, j):
    # L' = (1 - w_i - w_j) L + w_i p_j, 0 on the diagonal
    new_link = (1 - w_i[:, None] - w_j[None, :]) * link + w_i[:, None] * p_j[None, :]
    return tl.where(i[:, None] == j[None, :], 0.0, new_link)


@triton.jit
def _retention(write_w_ptr, b, N, acc: tl.constexpr, BLOCK: tl.constexpr):
    # 1 - sum_n w_n, the decay of p' = (1 - sum w) p + w, summed over N in BLOCK chunks
    total = tl.zeros([BLOCK], acc)
    for start in range(0, N, BLOCK):
        n = start + tl.arange(0, BLOCK)
        total += tl.load(write_w_ptr + b * N + n, mask=n < N, other=0.0).to(acc)
    return 1 - tl.sum(total, 0)


@triton.jit
def _read_through(link, right_j, left_i):
    # A tile's share of the reads through it, for R heads: (sum_j L[i, j] right[r, j] [BLOCK_R, BLOCK_I],
    # sum_i L[i, j] left[r, i] [BLOCK_R, BLOCK_J])
    return tl.sum(link[None, :, :] * right_j[:, None, :], 2), tl.sum(link[None, :, :] * left_i[:, :, None], 1)


@triton.jit
def _grad_through_reads(grad_forward_i, grad_backward_j, read_i, read_j):
    # What reaches the tile of L from f = L w and b = L^T w: sum_r df[r, i] w[r, j] + w[r, i] db[r, j]
    grad = grad_forward_i[:, :, None] * read_j[:, None, :] + read_i[:, :, None] * grad_backward_j[:, None, :]
    return tl.sum(grad, 0)


@triton.jit
def link_update_kernel(
    link_ptr,
    precedence_ptr,
    write_w_ptr,
    new_link_ptr,
    new_precedence_ptr,
    N,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    # One program per (b, i block, j block): L'[i, j] = (1 - w_i - w_j) L[i, j] + w_i p_j, L'[i, i] = 0,
    # one [BLOCK_I, BLOCK_J] tile in registers. The programs of the first row block also write
    # p' = (1 - sum w) p + w for their j block, summing w over N in BLOCK_J chunks.
    b = tl.program_id(0)
    acc = new_precedence_ptr.dtype.element_ty
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    j = tl.program_id(2) * BLOCK_J + tl.arange(0, BLOCK_J)
    w_i = tl.load(write_w_ptr + b * N + i, mask=i < N, other=0.0).to(acc)
    at, mask, link, w_j, p_j = _link_tile(link_ptr, write_w_ptr, precedence_ptr, b, N, i, j, acc)
    tl.store(new_link_ptr + at, _updated_link(link, w_i, w_j, p_j, i, j), mask=mask)
    if tl.program_id(1) == 0:
        keep = _retention(write_w_ptr, b, N, acc, BLOCK_J)
        tl.store(new_precedence_ptr + b * N + j, keep * p_j + w_j, mask=j < N)


@triton.jit
def link_reads_kernel(
    link_ptr,
    right_ptr,
    left_ptr,
    read_w_ptr,
    rows_ptr,
    column_part_ptr,
    grad_link_ptr,
    N,
    R,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GRAD_LINK: tl.constexpr,
):
    # One program per (b, i block), walking j tiles, for R heads at once:
    #   rows[r, i] = sum_j L[i, j] right[r, j]   (complete: kept in registers [BLOCK_R, BLOCK_I])
    #   columns[r, j] = sum_i L[i, j] left[r, i] (this block's partial [BLOCK_R, BLOCK_J] per tile)
    # Forward: right = left = w^r gives f = rows, b = columns. Backward: right = grad_b and
    # left = grad_f give grad_w = rows + columns, and with GRAD_LINK the tile of
    #   grad_L[i, j] = sum_r grad_f[r, i] w[r, j] + w[r, i] grad_b[r, j].
    b = tl.program_id(0)
    block = tl.program_id(1)
    acc = rows_ptr.dtype.element_ty
    r = tl.arange(0, BLOCK_R)
    i = block * BLOCK_I + tl.arange(0, BLOCK_I)
    ri, ri_mask = tile_at(b, r, R, i, N)
    left_i = tl.load(left_ptr + ri, mask=ri_mask, other=0.0).to(acc)
    if GRAD_LINK:
        read_i = tl.load(read_w_ptr + ri, mask=ri_mask, other=0.0).to(acc)
    rows = tl.zeros([BLOCK_R, BLOCK_I], acc)
    for start in range(0, N, BLOCK_J):
        j = start + tl.arange(0, BLOCK_J)
        at, mask = tile_at(b, i, N, j, N)
        rj, rj_mask = tile_at(b, r, R, j, N)
        link = tl.load(link_ptr + at, mask=mask, other=0.0).to(acc)
        right_j = tl.load(right_ptr + rj, mask=rj_mask, other=0.0).to(acc)
        rows_j, columns = _read_through(link, right_j, left_i)
        rows += rows_j
        part, _ = tile_at(b * tl.num_programs(1) + block, r, R, j, N)  # [B, blocks, R, N]
        tl.store(column_part_ptr + part, columns, mask=rj_mask)
        if GRAD_LINK:
            read_j = tl.load(read_w_ptr + rj, mask=rj_mask, other=0.0).to(acc)
            tl.store(grad_link_ptr + at, _grad_through_reads(left_i, right_j, read_i, read_j), mask=mask)
    tl.store(rows_ptr + ri, rows, mask=ri_mask)


@triton.jit
def link_update_reads_kernel(
    link_ptr,
    precedence_ptr,
    write_w_ptr,
    read_w_ptr,
    new_link_ptr,
    new_precedence_ptr,
    forward_ptr,
    backward_part_ptr,
    N,
    R,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # One program per (b, i block), walking j tiles: each tile of L is read once, turned into
    # L' = (1 - w_i - w_j) L + w_i p_j (0 on the diagonal), written once, and read through in
    # registers: f[r, i] += sum_j L' w^r_j ([BLOCK_R, BLOCK_I], complete) and this block's
    # partial of b[r, j] = sum_i L' w^r_i. The first row block also writes p'.
    b = tl.program_id(0)
    block = tl.program_id(1)
    acc = forward_ptr.dtype.element_ty
    r = tl.arange(0, BLOCK_R)
    i = block * BLOCK_I + tl.arange(0, BLOCK_I)
    w_i = tl.load(write_w_ptr + b * N + i, mask=i < N, other=0.0).to(acc)
    ri, ri_mask = tile_at(b, r, R, i, N)
    read_i = tl.load(read_w_ptr + ri, mask=ri_mask, other=0.0).to(acc)
    # 1 - sum w, needed by the first row block only (the others sum nothing)
    keep = tl.full([], 1, acc)
    if block == 0:
        keep = _retention(write_w_ptr, b, N, acc, BLOCK_J)
    forward = tl.zeros([BLOCK_R, BLOCK_I], acc)
    for start in range(0, N, BLOCK_J):
        j = start + tl.arange(0, BLOCK_J)
        at, mask, link, w_j, p_j = _link_tile(link_ptr, write_w_ptr, precedence_ptr, b, N, i, j, acc)
        new_link = _updated_link(link, w_i, w_j, p_j, i, j)
        tl.store(new_link_ptr + at, new_link, mask=mask)
        rj, rj_mask = tile_at(b, r, R, j, N)
        read_j = tl.load(read_w_ptr + rj, mask=rj_mask, other=0.0).to(acc)
        forward_j, backward = _read_through(new_link, read_j, read_i)
        forward += forward_j
        part, _ = tile_at(b * tl.num_programs(1) + block, r, R, j, N)  # [B, blocks, R, N]
        tl.store(backward_part_ptr + part, backward, mask=rj_mask)
        if block == 0:
            tl.store(new_precedence_ptr + b * N + j, keep * p_j + w_j, mask=j < N)
    tl.store(forward_ptr + ri, forward, mask=ri_mask)


@triton.jit
def link_update_backward_kernel(
    link_ptr,
    precedence_ptr,
    write_w_ptr,
    read_w_ptr,
    grad_new_link_ptr,
    grad_forward_ptr,
    grad_backward_ptr,
    grad_link_ptr,
    grad_w_rows_ptr,
    column_part_ptr,
    grad_read_rows_ptr,
    grad_read_part_ptr,
    N,
    R,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_R: tl.constexpr,
    READS: tl.constexpr,
):
    # The backward of link_update and (READS) of link_update_reads. One program per (b, i block),
    # walking j tiles. The gradient reaching L' is G = dL', with READS plus
    # sum_r df[r, i] w^r_j + w^r_i db[r, j]; 0 on the diagonal. Then
    #   dL = G (1 - w_i - w_j);  dw_i (row) = sum_j G (p_j - L);  dw_j (column) = -sum_i G L;
    #   dp_j = sum_i G w_i. The row sum stays in registers [BLOCK_I]; the two column sums are
    # this block's partials [2, BLOCK_J] per tile. With READS also, as in link_reads_kernel,
    # dw^r = L' db (rows, registers [BLOCK_R, BLOCK_I]) + L'^T df (columns, partials), with L'
    # recomputed from the L tile in registers, never loaded.
    b = tl.program_id(0)
    block = tl.program_id(1)
    blocks = tl.num_programs(1)
    acc = grad_w_rows_ptr.dtype.element_ty
    i = block * BLOCK_I + tl.arange(0, BLOCK_I)
    w_i = tl.load(write_w_ptr + b * N + i, mask=i < N, other=0.0).to(acc)
    if READS:
        r = tl.arange(0, BLOCK_R)
        ri, ri_mask = tile_at(b, r, R, i, N)
        read_i = tl.load(read_w_ptr + ri, mask=ri_mask, other=0.0).to(acc)
        grad_forward_i = tl.load(grad_forward_ptr + ri, mask=ri_mask, other=0.0).to(acc)
        read_rows = tl.zeros([BLOCK_R, BLOCK_I], acc)
    row = tl.zeros([BLOCK_I], acc)
    for start in range(0, N, BLOCK_J):
        j = start + tl.arange(0, BLOCK_J)
        at, mask, link, w_j, p_j = _link_tile(link_ptr, write_w_ptr, precedence_ptr, b, N, i, j, acc)
        grad = tl.load(grad_new_link_ptr + at, mask=mask, other=0.0).to(acc)
        if READS:
            rj, rj_mask = tile_at(b, r, R, j, N)
            read_j = tl.load(read_w_ptr + rj, mask=rj_mask, other=0.0).to(acc)
            grad_backward_j = tl.load(grad_backward_ptr + rj, mask=rj_mask, other=0.0).to(acc)
            new_link = _updated_link(link, w_i, w_j, p_j, i, j)
            read_rows_j, read_columns = _read_through(new_link, grad_backward_j, grad_forward_i)
            read_rows += read_rows_j
            part, _ = tile_at(b * blocks + block, r, R, j, N)  # [B, blocks, R, N]
            tl.store(grad_read_part_ptr + part, read_columns, mask=rj_mask)
            grad += _grad_through_reads(grad_forward_i, grad_backward_j, read_i, read_j)
        grad = tl.where(i[:, None] == j[None, :], 0.0, grad)
        tl.store(grad_link_ptr + at, grad * (1 - w_i[:, None] - w_j[None, :]), mask=mask)
        row += tl.sum(grad * (p_j[None, :] - link), 1)
        column = ((b * blocks + block) * 2) * N + j
        tl.store(column_part_ptr + column, -tl.sum(grad * link, 0), mask=j < N)
        tl.store(column_part_ptr + column + N, tl.sum(grad * w_i[:, None], 0), mask=j < N)
    tl.store(grad_w_rows_ptr + b * N + i, row, mask=i < N)
    if READS:
        tl.store(grad_read_rows_ptr + ri, read_rows, mask=ri_mask)


def link_update_forward(link: Tensor, precedence: Tensor, write_w: Tensor) -> tuple[Tensor, Tensor]:
    link, precedence, write_w = contiguous(link, precedence, write_w)
    B, N, _ = link.shape
    block = min(BLOCK, pow2(N))
    new_link = torch.empty_like(link)
    new_precedence = torch.empty(B, N, dtype=accumulator_dtype(link.dtype), device=link.device)
    grid = (B, triton.cdiv(N, block), triton.cdiv(N, block))
    link_update_kernel[grid](link, precedence, write_w, new_link, new_precedence, N, BLOCK_I=block, BLOCK_J=block)
    return new_link, new_precedence.to(precedence.dtype)


def link_update_backward(grads, inputs, outputs) -> tuple[Tensor, Tensor, Tensor]:
    return _update_backward(grads, inputs)


def _update_backward(grads, inputs) -> tuple[Tensor, ...]:
    """The grads of link_update's inputs from grads [dL', dp'], inputs [L, p, w]; or of
    link_update_reads's, from grads [dL', dp', df, db], inputs [L, p, w, w^r]."""
    grad_new_link, grad_new_precedence, *grad_reads = contiguous(*grads)
    link, precedence, write_w, *reads = contiguous(*inputs)
    B, N, _ = link.shape
    acc = accumulator_dtype(link.dtype)
    if reads:
        (read_w,), (grad_forward, grad_backward) = reads, grad_reads
        R = read_w.shape[1]
        BLOCK_R, block = _reads_blocks(N, R)
    else:  # the read pointers are never dereferenced: any tensor stands in for them
        read_w = grad_forward = grad_backward = write_w
        R, BLOCK_R, block = 1, 1, min(BLOCK, pow2(N))
    blocks = triton.cdiv(N, block)
    grad_link = torch.empty_like(link)
    grad_w_rows = torch.empty(B, N, dtype=acc, device=link.device)
    column_part = torch.empty(B, blocks, 2, N, dtype=acc, device=link.device)
    grad_read_rows = torch.empty(B, R, N, dtype=acc, device=link.device) if reads else grad_w_rows
    grad_read_part = torch.empty(B, blocks, R, N, dtype=acc, device=link.device) if reads else grad_w_rows
    link_update_backward_kernel[(B, blocks)](
        link,
        precedence,
        write_w,
        read_w,
        grad_new_link,
        grad_forward,
        grad_backward,
        grad_link,
        grad_w_rows,
        column_part,
        grad_read_rows,
        grad_read_part,
        N,
        R,
        BLOCK_I=block,
        BLOCK_J=block,
        BLOCK_R=BLOCK_R,
        READS=bool(reads),
    )
    grad_precedence, grad_w = _precedence_grads(grad_w_rows, column_part, grad_new_precedence, precedence, write_w)
    if not reads:
        return grad_link, grad_precedence, grad_w
    return grad_link, grad_precedence, grad_w, (grad_read_rows + grad_read_part.sum(1)).to(read_w.dtype)


def _precedence_grads(grad_w_rows, column_part, grad_new_precedence, precedence, write_w) -> tuple[Tensor, Tensor]:
    """(grad precedence, grad write_w) from the kernels' row sums and [B, blocks, 2, N] column partials.

    p' = (1 - sum w) p + w adds dw_n = dp'_n - sum_m dp'_m p_m and gives dp = dp' (1 - sum w).
    """
    acc = grad_w_rows.dtype
    columns = column_part.sum(1)
    grad_new_precedence, p, w = (t.to(acc) for t in (grad_new_precedence, precedence, write_w))
    grad_w = grad_w_rows + columns[:, 0] + grad_new_precedence - (grad_new_precedence * p).sum(-1, keepdim=True)
    grad_precedence = columns[:, 1] + grad_new_precedence * (1 - w.sum(-1, keepdim=True))
    return grad_precedence.to(precedence.dtype), grad_w.to(write_w.dtype)


def _link_reads(
    link: Tensor, right: Tensor, left: Tensor, read_w: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(L right, L^T left, grad_L or None) for [B, R, N] right/left; grad_L when read_w is given."""
    B, N, _ = link.shape
    R = right.shape[1]
    acc = accumulator_dtype(link.dtype)
    BLOCK_R, block = _reads_blocks(N, R)
    blocks = triton.cdiv(N, block)
    rows = torch.empty(B, R, N, dtype=acc, device=link.device)
    column_part = torch.empty(B, blocks, R, N, dtype=acc, device=link.device)
    grad_link = torch.empty_like(link) if read_w is not None else None
    link_reads_kernel[(B, blocks)](
        link,
        right,
        left,
        read_w if read_w is not None else right,
        rows,
        column_part,
        grad_link if grad_link is not None else link,
        N,
        R,
        BLOCK_I=block,
        BLOCK_J=block,
        BLOCK_R=BLOCK_R,
        GRAD_LINK=read_w is not None,
    )
    return rows, column_part.sum(1), grad_link


def temporal_reads_forward(link: Tensor, read_w: Tensor) -> tuple[Tensor, Tensor]:
    link, read_w = contiguous(link, read_w)
    forward, backward, _ = _link_reads(link, read_w, read_w, None)
    return forward.to(read_w.dtype), backward.to(read_w.dtype)


def temporal_reads_backward(grads, inputs, outputs) -> tuple[Tensor, Tensor]:
    grad_forward, grad_backward = contiguous(*grads)
    link, read_w = contiguous(*inputs)
    rows, columns, grad_link = _link_reads(link, grad_backward, grad_forward, read_w)
    return grad_link, (rows + columns).to(read_w.dtype)


def _reads_blocks(N: int, R: int) -> tuple[int, int]:
    """(BLOCK_R, block) so that a [BLOCK_R, block, block] product stays within TILE_ELEMENTS."""
    BLOCK_R = pow2(R)
    return BLOCK_R, min(BLOCK, pow2(N), 1 << (int((TILE_ELEMENTS // BLOCK_R) ** 0.5).bit_length() - 1))


def link_update_reads_forward(
    link: Tensor, precedence: Tensor, write_w: Tensor, read_w: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    link, precedence, write_w, read_w = contiguous(link, precedence, write_w, read_w)
    B, N, _ = link.shape
    R = read_w.shape[1]
    acc = accumulator_dtype(link.dtype)
    BLOCK_R, block = _reads_blocks(N, R)
    blocks = triton.cdiv(N, block)
    new_link = torch.empty_like(link)
    new_precedence = torch.empty(B, N, dtype=acc, device=link.device)
    forward = torch.empty(B, R, N, dtype=acc, device=link.device)
    backward_part = torch.empty(B, blocks, R, N, dtype=acc, device=link.device)
    link_update_reads_kernel[(B, blocks)](
        link,
        precedence,
        write_w,
        read_w,
        new_link,
        new_precedence,
        forward,
        backward_part,
        N,
        R,
        BLOCK_I=block,
        BLOCK_J=block,
        BLOCK_R=BLOCK_R,
    )
    dtype = link.dtype
    return new_link, new_precedence.to(dtype), forward.to(dtype), backward_part.sum(1).to(dtype)


def link_update_reads_backward(grads, inputs, outputs) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _update_backward(grads, inputs)
