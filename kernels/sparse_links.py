"""SDNC's sparse temporal links on gathered rows: sparse_link_update and sparse_temporal_reads.

The algorithm is the C++ kernel's (csrc/cpu/sparse_links.cpp), the contract sparsemem/ops/
sparse_links.py's. A link row is K_L (slot, value) pairs, slot -1 for an empty place; every row's
candidates are ranked by (value desc, slot asc) among the valid ones (slot >= 0, value > 0) and
the best K_L kept, then (-1, 0). Each elementwise step is rounded to the input dtype as the
reference's torch ops round it (a no-op in float32 and float64), so bf16 ties are the reference's.

sparse_link_update, two launches:
1. grid (B, row blocks of the forward store + row blocks of the backward store + 1): a program
   builds the candidates of BLOCK_R rows ([BLOCK_R, BLOCK_L] stored entries plus [BLOCK_R, BLOCK_L]
   precedence slots (forward rows) or [BLOCK_R, BLOCK_J] written slots (backward rows), all in
   registers) and writes their top K_L to a scratch copy of the stores; the last program of a
   batch row writes the new precedence. Each program first sums the J write weights per slot
   (a sequential loop, so repeated slots add in the reference's order) and keeps the distinct
   written slots and the precedence ([BLOCK_J], [BLOCK_L]) in registers; a lookup w(s) or p(s)
   is a compare against them ([.., BLOCK_J] at most, one match, so exact).
2. the mutual cut, grid (B, the same row blocks): an entry (row slot r, slot e) stays if the
   other store's row of e (found by comparing e against that store's slots, BLOCK_O at a time)
   has r among its top K_L, or was not gathered. Kept entries move to the front in order.
The backward is one program per batch row: it walks the row blocks of both stores and the
precedence, writes each input row's grads and keeps the grads of the distinct written slots and
of the precedence in registers (no atomics: the order of every sum is fixed).

sparse_temporal_reads: one program per head (b, r) for both directions. The Q * K_L
contributions w_q v_ql sit in registers [BLOCK_Q, BLOCK_L]; equal slots are summed by a
sequential loop over them (the reference's order), and the top K taken in K rounds. The
backward compares every contribution's slot with the K kept ones.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import TILE_ELEMENTS, accumulator_dtype, contiguous, pow2, tile_at

NO_SLOT = tl.constexpr(-2)  # the lookup key of an empty place: never equal to a slot, not even to -1
LAST_SLOT = tl.constexpr(2**62)


@triton.jit
def _rounded(x, like_ptr):
    # x rounded to the dtype of like_ptr's elements, as a torch op in that dtype leaves it
    return x.to(like_ptr.dtype.element_ty).to(x.dtype)


@triton.jit
def _lookup(queries, keys, values):
    # values[c] where keys[c] == queries[x, y], else 0: [X, Y] -> [X, Y]; keys distinct
    return tl.sum(tl.where(queries[:, :, None] == keys[None, None, :], values[None, None, :], 0.0), 2)


@triton.jit
def _lookup_rows(queries, keys, values):
    # _lookup for queries [X] -> [X]
    return tl.sum(tl.where(queries[:, None] == keys[None, :], values[None, :], 0.0), 1)


@triton.jit
def _add_at(queries, grads, keys):
    # sum of grads [X, Y] at the places c where keys[c] == queries[x, y]: -> [C]
    return tl.sum(tl.sum(tl.where(queries[:, :, None] == keys[None, None, :], grads[:, :, None], 0.0), 1), 0)


@triton.jit
def _add_at_rows(queries, grads, keys):
    # _add_at for queries, grads [X] -> [C]
    return tl.sum(tl.where(queries[:, None] == keys[None, :], grads[:, None], 0.0), 0)


@triton.jit
def _writes(write_indices_ptr, write_weights_ptr, b, J, acc: tl.constexpr, BLOCK_J: tl.constexpr):
    # The write weights of batch row b summed per slot, in the order of j (the reference's
    # scatter_add): -> (written [BLOCK_J]: the first place of each written slot holds the slot,
    # every other place NO_SLOT; written_w: the summed weight there, else 0; total: sum_j w_j).
    j = tl.arange(0, BLOCK_J)
    slots = tl.load(write_indices_ptr + b * J + j, mask=j < J, other=-1)
    sums = tl.zeros([BLOCK_J], acc)
    first = slots >= 0
    total = tl.sum(tl.zeros([BLOCK_J], acc), 0)
    for place in range(J):
        slot = tl.load(write_indices_ptr + b * J + place)
        weight = tl.where(slot >= 0, tl.load(write_weights_ptr + b * J + place).to(acc), 0.0)
        total += weight
        match = (slots == slot) & (slot >= 0)
        sums = tl.where(match, _rounded(sums + weight, write_weights_ptr), sums)
        first = first & ~(match & (j > place))
    written = tl.where(first, slots, NO_SLOT)
    return written, tl.where(first, sums, 0.0), _rounded(total, write_weights_ptr)


@triton.jit
def _precedence(precedence_indices_ptr, precedence_values_ptr, b, K_L, acc: tl.constexpr, BLOCK_L: tl.constexpr):
    # p of batch row b: (keys [BLOCK_L], NO_SLOT at empty places; values, 0 there)
    l = tl.arange(0, BLOCK_L)
    slots = tl.load(precedence_indices_ptr + b * K_L + l, mask=l < K_L, other=-1)
    values = tl.load(precedence_values_ptr + b * K_L + l, mask=l < K_L, other=0.0).to(acc)
    return tl.where(slots >= 0, slots, NO_SLOT), tl.where(slots >= 0, values, 0.0)


@triton.jit
def _link_entry(value, w_row, w_column, p_column, like_ptr):
    # L[i, j] after a write: v (1 - w_i - w_j) + w_i p_j, one expression for both stores so both get equal bits
    keep = _rounded(_rounded(1.0 - w_row, like_ptr) - w_column, like_ptr)
    return _rounded(_rounded(value * keep, like_ptr) + _rounded(w_row * p_column, like_ptr), like_ptr)


@triton.jit
def _take_top(key_a, slot_a, key_b, slot_b, k, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    # The k best of two candidate sets per row, key_a [BLOCK_R, A] and key_b [BLOCK_R, C] (-inf:
    # not a candidate; slots distinct within a row), by (key desc, slot asc): k rounds, each
    # taking the best left. -> (values, slots) [BLOCK_R, BLOCK_K], then (0, -1) once none is left.
    position = tl.arange(0, BLOCK_K)[None, :]
    values = tl.zeros([BLOCK_R, BLOCK_K], key_a.dtype)
    slots = tl.full([BLOCK_R, BLOCK_K], -1, tl.int64)
    for m in range(k):
        top = tl.maximum(tl.max(key_a, 1), tl.max(key_b, 1))
        at_top_a = tl.min(tl.where(key_a == top[:, None], slot_a, LAST_SLOT), 1)
        top_slot = tl.minimum(at_top_a, tl.min(tl.where(key_b == top[:, None], slot_b, LAST_SLOT), 1))
        here = (position == m) & (top > float("-inf"))[:, None]
        values = tl.where(here, top[:, None], values)
        slots = tl.where(here, top_slot[:, None], slots)
        key_a = tl.where(slot_a == top_slot[:, None], float("-inf"), key_a)
        key_b = tl.where(slot_b == top_slot[:, None], float("-inf"), key_b)
    return values, slots


@triton.jit
def _load_row_block(slots_ptr, indices_ptr, values_ptr, b, block, rows, K_L, acc: tl.constexpr, BLOCK_R: tl.constexpr,
               BLOCK_L: tl.constexpr):  # fmt: skip
    # Rows [block * BLOCK_R, +BLOCK_R) of a store: (their places [BLOCK_R, BLOCK_L] and mask, slots
    # [BLOCK_R], entries, values), -1 / 0 past the rows and K_L.
    r = block * BLOCK_R + tl.arange(0, BLOCK_R)
    at, mask = tile_at(b, r, rows, tl.arange(0, BLOCK_L), K_L)
    row_slot = tl.load(slots_ptr + b * rows + r, mask=r < rows, other=-1)
    entries = tl.load(indices_ptr + at, mask=mask, other=-1)
    values = tl.load(values_ptr + at, mask=mask, other=0.0).to(acc)
    return at, mask, row_slot, entries, values


@triton.jit
def _link_rows(
    slots_ptr,
    indices_ptr,
    values_ptr,
    cut_indices_ptr,
    cut_values_ptr,
    b,
    block,
    rows,
    K_L,
    written,
    written_w,
    p_keys,
    p_values,
    FORWARD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    # BLOCK_R rows of one store: their updated entries plus the new ones, top K_L -> the scratch.
    # Forward row i (of L): entries j, new w_i p_j at precedence slots j; backward row j (column j
    # of L): entries i, new w_i p_j at written slots i; new only where not stored and not the diagonal.
    at, mask, row_slot, entries, values = _load_row_block(
        slots_ptr, indices_ptr, values_ptr, b, block, rows, K_L, p_values.dtype, BLOCK_R, BLOCK_L
    )
    w_row = _lookup_rows(row_slot, written, written_w)[:, None]
    w_entries = _lookup(entries, written, written_w)
    if FORWARD:
        values = _link_entry(values, w_row, w_entries, _lookup(entries, p_keys, p_values), values_ptr)
        new_slots = p_keys
        new_values = _rounded(w_row * p_values[None, :], values_ptr)
    else:
        p_row = _lookup_rows(row_slot, p_keys, p_values)[:, None]
        values = _link_entry(values, w_entries, w_row, p_row, values_ptr)
        new_slots = written
        new_values = _rounded(written_w[None, :] * p_row, values_ptr)
    stored = tl.max((entries[:, :, None] == new_slots[None, None, :]).to(tl.int32), 1) > 0
    fresh = (new_slots[None, :] >= 0) & ~stored & (new_slots[None, :] != row_slot[:, None])
    key_stored = tl.where((entries >= 0) & (values > 0), values, float("-inf"))
    key_new = tl.where(fresh & (new_values > 0), new_values, float("-inf"))
    new_slots = new_slots[None, :] + tl.zeros([BLOCK_R, 1], tl.int64)
    top, top_slots = _take_top(key_stored, entries, key_new, new_slots, K_L, BLOCK_R, BLOCK_L)
    tl.store(cut_values_ptr + at, top, mask=mask)
    tl.store(cut_indices_ptr + at, top_slots, mask=mask)


@triton.jit
def sparse_link_rows_kernel(
    forward_slots_ptr,
    forward_indices_ptr,
    forward_values_ptr,
    backward_slots_ptr,
    backward_indices_ptr,
    backward_values_ptr,
    precedence_indices_ptr,
    precedence_values_ptr,
    write_indices_ptr,
    write_weights_ptr,
    cut_forward_indices_ptr,
    cut_forward_values_ptr,
    cut_backward_indices_ptr,
    cut_backward_values_ptr,
    new_precedence_indices_ptr,
    new_precedence_values_ptr,
    F,
    G,
    K_L,
    J,
    forward_blocks,
    backward_blocks,
    BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    # Program (b, block): forward row block, backward row block, or (the last) the precedence.
    # Registers: the writes [BLOCK_J] and precedence [BLOCK_L], then one block's candidates.
    b = tl.program_id(0)
    block = tl.program_id(1)
    acc: tl.constexpr = tl.float64 if forward_values_ptr.dtype.element_ty == tl.float64 else tl.float32
    written, written_w, total = _writes(write_indices_ptr, write_weights_ptr, b, J, acc, BLOCK_J)
    p_keys, p_values = _precedence(precedence_indices_ptr, precedence_values_ptr, b, K_L, acc, BLOCK_L)
    if block < forward_blocks:
        _link_rows(
            forward_slots_ptr, forward_indices_ptr, forward_values_ptr, cut_forward_indices_ptr,
            cut_forward_values_ptr, b, block, F, K_L, written, written_w, p_keys, p_values,
            True, BLOCK_R, BLOCK_L,
        )  # fmt: skip
    elif block < forward_blocks + backward_blocks:
        _link_rows(
            backward_slots_ptr, backward_indices_ptr, backward_values_ptr, cut_backward_indices_ptr,
            cut_backward_values_ptr, b, block - forward_blocks, G, K_L, written, written_w, p_keys, p_values,
            False, BLOCK_R, BLOCK_L,
        )  # fmt: skip
    else:
        # p = (1 - sum w) p + w on its slots, plus w at the written slots not in it; top K_L
        retain = _rounded(1.0 - total, write_weights_ptr)
        decayed = _rounded(retain * p_values, write_weights_ptr)
        values = _rounded(decayed + _lookup_rows(p_keys, written, written_w), write_weights_ptr)
        stored = tl.max((written[:, None] == p_keys[None, :]).to(tl.int32), 1) > 0
        key_stored = tl.where((p_keys >= 0) & (values > 0), values, float("-inf"))[None, :]
        key_new = tl.where((written >= 0) & ~stored & (written_w > 0), written_w, float("-inf"))[None, :]
        top, top_slots = _take_top(key_stored, p_keys[None, :], key_new, written[None, :], K_L, 1, BLOCK_L)
        l = tl.arange(0, BLOCK_L)[None, :]
        tl.store(new_precedence_values_ptr + b * K_L + l, top, mask=l < K_L)
        tl.store(new_precedence_indices_ptr + b * K_L + l, top_slots, mask=l < K_L)


@triton.jit
def _cut_rows(
    slots_ptr,
    cut_indices_ptr,
    cut_values_ptr,
    out_indices_ptr,
    out_values_ptr,
    other_slots_ptr,
    other_cut_indices_ptr,
    b,
    block,
    rows,
    other_rows,
    K_L,
    BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_O: tl.constexpr,
):
    # Entry (row slot r, slot e) stays if the other store has no row of e or that row's top K_L
    # holds r. Registers: the block's entries [BLOCK_R, BLOCK_L], BLOCK_O of the other store's
    # slots at a time, then the other rows of the entries [BLOCK_R, BLOCK_L, BLOCK_L].
    at, mask, row_slot, entries, values = _load_row_block(
        slots_ptr, cut_indices_ptr, cut_values_ptr, b, block, rows, K_L, cut_values_ptr.dtype.element_ty,
        BLOCK_R, BLOCK_L,
    )  # fmt: skip
    r = block * BLOCK_R + tl.arange(0, BLOCK_R)
    l = tl.arange(0, BLOCK_L)
    other_row = tl.full([BLOCK_R, BLOCK_L], -1, tl.int32)
    for start in range(0, other_rows, BLOCK_O):
        o = start + tl.arange(0, BLOCK_O)
        other_slots = tl.load(other_slots_ptr + b * other_rows + o, mask=o < other_rows, other=-1)
        hit = (entries[:, :, None] == other_slots[None, None, :]) & (entries >= 0)[:, :, None]
        other_row = tl.maximum(other_row, tl.max(tl.where(hit, o[None, None, :], -1), 2))
    found = other_row >= 0
    other_at = (b * other_rows + other_row[:, :, None]) * K_L + l[None, None, :]
    tops = tl.load(other_cut_indices_ptr + other_at, mask=found[:, :, None] & (l < K_L)[None, None, :], other=-1)
    holds = tl.max((tops == row_slot[:, None, None]).to(tl.int32), 2) > 0
    kept = mask & (entries >= 0) & (~found | holds)
    # kept entries to the front, in order: entry m goes to the number of kept entries before it
    before = tl.where(l[None, None, :] < l[None, :, None], kept[:, None, :].to(tl.int32), 0)
    rank = tl.sum(before, 2)
    count = tl.sum(kept.to(tl.int32), 1)
    to = (b * rows + r[:, None]) * K_L + rank
    tl.store(out_indices_ptr + to, entries, mask=kept)
    tl.store(out_values_ptr + to, values, mask=kept)
    empty = mask & (l[None, :] >= count[:, None])
    tl.store(out_indices_ptr + at, tl.full([BLOCK_R, BLOCK_L], -1, tl.int64), mask=empty)
    tl.store(out_values_ptr + at, tl.zeros([BLOCK_R, BLOCK_L], values.dtype), mask=empty)


@triton.jit
def sparse_link_cut_kernel(
    forward_slots_ptr,
    backward_slots_ptr,
    cut_forward_indices_ptr,
    cut_forward_values_ptr,
    cut_backward_indices_ptr,
    cut_backward_values_ptr,
    new_forward_indices_ptr,
    new_forward_values_ptr,
    new_backward_indices_ptr,
    new_backward_values_ptr,
    F,
    G,
    K_L,
    forward_blocks,
    BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_O: tl.constexpr,
):
    # Program (b, block): the mutual cut of one row block of the forward or the backward store.
    b = tl.program_id(0)
    block = tl.program_id(1)
    if block < forward_blocks:
        _cut_rows(
            forward_slots_ptr, cut_forward_indices_ptr, cut_forward_values_ptr, new_forward_indices_ptr,
            new_forward_values_ptr, backward_slots_ptr, cut_backward_indices_ptr, b, block, F, G, K_L,
            BLOCK_R, BLOCK_L, BLOCK_O,
        )  # fmt: skip
    else:
        _cut_rows(
            backward_slots_ptr, cut_backward_indices_ptr, cut_backward_values_ptr, new_backward_indices_ptr,
            new_backward_values_ptr, forward_slots_ptr, cut_forward_indices_ptr, b, block - forward_blocks, G, F,
            K_L, BLOCK_R, BLOCK_L, BLOCK_O,
        )  # fmt: skip


def _row_block(rows: int, *widths: int, cap: int = 32) -> int:
    """Rows per program so that one [BLOCK_R, *widths] tile stays within TILE_ELEMENTS."""
    per_row = 1
    for width in widths:
        per_row *= width
    return max(1, min(cap, pow2(rows), TILE_ELEMENTS // per_row))


def sparse_link_update_forward(
    forward_slots: Tensor,
    forward_indices: Tensor,
    forward_values: Tensor,
    backward_slots: Tensor,
    backward_indices: Tensor,
    backward_values: Tensor,
    precedence_indices: Tensor,
    precedence_values: Tensor,
    write_indices: Tensor,
    write_weights: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    (forward_slots, forward_indices, forward_values, backward_slots, backward_indices, backward_values,
     precedence_indices, precedence_values, write_indices, write_weights) = contiguous(
        forward_slots, forward_indices, forward_values, backward_slots, backward_indices, backward_values,
        precedence_indices, precedence_values, write_indices, write_weights,
    )  # fmt: skip
    B, F, K_L = forward_indices.shape
    G, J = backward_indices.shape[1], write_indices.shape[1]
    new = (
        torch.empty_like(forward_values),
        torch.empty_like(forward_indices),
        torch.empty_like(backward_values),
        torch.empty_like(backward_indices),
        torch.empty_like(precedence_values),
        torch.empty_like(precedence_indices),
    )
    if B == 0 or K_L == 0:
        return new
    BLOCK_L, BLOCK_J = pow2(K_L), pow2(J)
    BLOCK_R = _row_block(max(F, G), BLOCK_L, max(BLOCK_L, BLOCK_J))
    forward_blocks, backward_blocks = triton.cdiv(F, BLOCK_R), triton.cdiv(G, BLOCK_R)
    cut = (
        torch.empty_like(forward_indices),
        torch.empty_like(forward_values),
        torch.empty_like(backward_indices),
        torch.empty_like(backward_values),
    )
    sparse_link_rows_kernel[(B, forward_blocks + backward_blocks + 1)](
        forward_slots, forward_indices, forward_values, backward_slots, backward_indices, backward_values,
        precedence_indices, precedence_values, write_indices, write_weights, *cut, new[5], new[4],
        F, G, K_L, J, forward_blocks, backward_blocks, BLOCK_R=BLOCK_R, BLOCK_L=BLOCK_L, BLOCK_J=BLOCK_J,
    )  # fmt: skip
    if forward_blocks + backward_blocks > 0:
        BLOCK_O = max(1, min(pow2(max(F, G)), TILE_ELEMENTS // (BLOCK_R * BLOCK_L)))
        sparse_link_cut_kernel[(B, forward_blocks + backward_blocks)](
            forward_slots, backward_slots, *cut, new[1], new[0], new[3], new[2], F, G, K_L, forward_blocks,
            BLOCK_R=BLOCK_R, BLOCK_L=BLOCK_L, BLOCK_O=BLOCK_O,
        )  # fmt: skip
    return new


@triton.jit
def _link_rows_backward(
    slots_ptr,
    indices_ptr,
    values_ptr,
    new_indices_ptr,
    grad_new_values_ptr,
    grad_values_ptr,
    b,
    block,
    rows,
    K_L,
    written,
    written_w,
    p_keys,
    p_values,
    FORWARD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    # Each kept entry (i, j) of L with grad g is an input entry v (the same slot in the input
    # row) or a new one: v' = v (1 - w_i - w_j) + w_i p_j, or v' = w_i p_j. Writes the grads of the
    # block's input values; -> the grads of w at the distinct written slots [BLOCK_J] and of p [BLOCK_L].
    acc = p_values.dtype
    at, mask, row_slot, entries, values = _load_row_block(
        slots_ptr, indices_ptr, values_ptr, b, block, rows, K_L, acc, BLOCK_R, BLOCK_L
    )
    kept = tl.load(new_indices_ptr + at, mask=mask, other=-1)
    grad = tl.load(grad_new_values_ptr + at, mask=mask, other=0.0).to(acc)
    grad = tl.where(kept >= 0, grad, 0.0)
    # match [BLOCK_R, kept entry m, input entry l]: kept m was stored at l
    match = (kept[:, :, None] == entries[:, None, :]) & (kept >= 0)[:, :, None]
    stored = tl.max(match.to(tl.int32), 2) > 0
    value = tl.sum(tl.where(match, values[:, None, :], 0.0), 2)
    w_row = _lookup_rows(row_slot, written, written_w)[:, None]
    w_kept = _lookup(kept, written, written_w)
    if FORWARD:  # row i, kept slots j
        w_i = w_row
        w_j = w_kept
        p_j = _lookup(kept, p_keys, p_values)
    else:  # row j, kept slots i
        w_i = w_kept
        w_j = w_row
        p_j = _lookup_rows(row_slot, p_keys, p_values)[:, None]
    grad_input = tl.sum(tl.where(match, (grad * (1.0 - w_i - w_j))[:, :, None], 0.0), 1)
    tl.store(grad_values_ptr + at, grad_input, mask=mask)
    to_w_i = tl.where(stored, grad * (p_j - value), grad * p_j)
    to_w_j = tl.where(stored, -grad * value, 0.0)
    to_p_j = grad * w_i
    if FORWARD:
        grad_w = _add_at_rows(row_slot, tl.sum(to_w_i, 1), written) + _add_at(kept, to_w_j, written)
        grad_p = _add_at(kept, to_p_j, p_keys)
    else:
        grad_w = _add_at(kept, to_w_i, written) + _add_at_rows(row_slot, tl.sum(to_w_j, 1), written)
        grad_p = _add_at_rows(row_slot, tl.sum(to_p_j, 1), p_keys)
    return grad_w, grad_p


@triton.jit
def sparse_link_update_backward_kernel(
    forward_slots_ptr,
    forward_indices_ptr,
    forward_values_ptr,
    backward_slots_ptr,
    backward_indices_ptr,
    backward_values_ptr,
    precedence_indices_ptr,
    precedence_values_ptr,
    write_indices_ptr,
    write_weights_ptr,
    new_forward_indices_ptr,
    new_backward_indices_ptr,
    new_precedence_indices_ptr,
    grad_new_forward_ptr,
    grad_new_backward_ptr,
    grad_new_precedence_ptr,
    grad_forward_values_ptr,
    grad_backward_values_ptr,
    grad_precedence_values_ptr,
    grad_write_weights_ptr,
    F,
    G,
    K_L,
    J,
    BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    # One program per batch row. Registers: the writes [BLOCK_J], the precedence [BLOCK_L], their
    # grads (summed over all row blocks), one row block's entries at a time.
    b = tl.program_id(0)
    acc: tl.constexpr = grad_write_weights_ptr.dtype.element_ty
    written, written_w, total = _writes(write_indices_ptr, write_weights_ptr, b, J, acc, BLOCK_J)
    p_keys, p_values = _precedence(precedence_indices_ptr, precedence_values_ptr, b, K_L, acc, BLOCK_L)
    grad_w = tl.zeros([BLOCK_J], acc)
    grad_p = tl.zeros([BLOCK_L], acc)
    for block in range(tl.cdiv(F, BLOCK_R)):
        block_w, block_p = _link_rows_backward(
            forward_slots_ptr, forward_indices_ptr, forward_values_ptr, new_forward_indices_ptr, grad_new_forward_ptr,
            grad_forward_values_ptr, b, block, F, K_L, written, written_w, p_keys, p_values, True, BLOCK_R, BLOCK_L,
        )  # fmt: skip
        grad_w += block_w
        grad_p += block_p
    for block in range(tl.cdiv(G, BLOCK_R)):
        block_w, block_p = _link_rows_backward(
            backward_slots_ptr, backward_indices_ptr, backward_values_ptr, new_backward_indices_ptr,
            grad_new_backward_ptr, grad_backward_values_ptr, b, block, G, K_L, written, written_w, p_keys,
            p_values, False, BLOCK_R, BLOCK_L,
        )  # fmt: skip
        grad_w += block_w
        grad_p += block_p
    # precedence p' = (1 - sum w) p + w: kept slot s with grad g
    l = tl.arange(0, BLOCK_L)
    kept = tl.load(new_precedence_indices_ptr + b * K_L + l, mask=l < K_L, other=-1)
    grad = tl.load(grad_new_precedence_ptr + b * K_L + l, mask=l < K_L, other=0.0).to(acc)
    grad = tl.where(kept >= 0, grad, 0.0)
    match = (kept[:, None] == p_keys[None, :]).to(acc)  # [kept m, place l]
    grad_p += tl.sum(match * grad[:, None], 0) * (1.0 - total)
    grad_total = -tl.sum(tl.sum(match * (grad[:, None] * p_values[None, :]), 1), 0)
    grad_w += _add_at_rows(kept, grad, written)
    tl.store(grad_precedence_values_ptr + b * K_L + l, grad_p, mask=l < K_L)
    # each write place gets its slot's grad (held at the slot's first place) and the total's
    j = tl.arange(0, BLOCK_J)
    slots = tl.load(write_indices_ptr + b * J + j, mask=j < J, other=-1)
    grad_places = _lookup_rows(slots, written, grad_w) + grad_total
    tl.store(grad_write_weights_ptr + b * J + j, tl.where(slots >= 0, grad_places, 0.0), mask=j < J)


def sparse_link_update_backward(grads: list[Tensor], inputs: list[Tensor], outputs: list[Tensor]) -> list[Tensor]:
    """grads of the new forward, backward and precedence values -> [grad_forward_values,
    grad_backward_values, grad_precedence_values, grad_write_weights]."""
    inputs = contiguous(*inputs)
    forward_values, backward_values, precedence_values, write_weights = (inputs[i] for i in (2, 5, 7, 9))
    grad_forward, grad_backward, grad_precedence = contiguous(*grads)
    new_forward_indices, new_backward_indices, new_precedence_indices = contiguous(*outputs[1::2])
    B, F, K_L = forward_values.shape
    G, J = backward_values.shape[1], write_weights.shape[1]
    acc = accumulator_dtype(forward_values.dtype)
    grad_inputs = [
        torch.empty(forward_values.shape, dtype=acc, device=forward_values.device),
        torch.empty(backward_values.shape, dtype=acc, device=forward_values.device),
        torch.empty(precedence_values.shape, dtype=acc, device=forward_values.device),
        torch.empty(write_weights.shape, dtype=acc, device=forward_values.device),
    ]
    if B > 0 and K_L > 0:
        BLOCK_L, BLOCK_J = pow2(K_L), pow2(J)
        sparse_link_update_backward_kernel[(B,)](
            *inputs, new_forward_indices, new_backward_indices, new_precedence_indices, grad_forward, grad_backward,
            grad_precedence, *grad_inputs, F, G, K_L, J,
            BLOCK_R=_row_block(max(F, G), BLOCK_L, max(BLOCK_L, BLOCK_J)), BLOCK_L=BLOCK_L, BLOCK_J=BLOCK_J,
        )  # fmt: skip
    else:
        for grad in grad_inputs:
            grad.zero_()
    return [grad.to(forward_values.dtype) for grad in grad_inputs]


@triton.jit
def _reads_through(
    read_weights_ptr,
    indices_ptr,
    values_ptr,
    out_weights_ptr,
    out_slots_ptr,
    head,
    Q,
    K_L,
    k,
    BLOCK_Q: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # sum_q w_q row_q for one head: contributions [BLOCK_Q, BLOCK_L] summed per slot in the
    # order of (q, l) (the reference's scatter_add), the sum held at the slot's first place. One
    # row q' a step: its slots are distinct, so each place takes at most one of its K_L
    # contributions and the sums are added in the reference's order.
    acc: tl.constexpr = tl.float64 if values_ptr.dtype.element_ty == tl.float64 else tl.float32
    q = tl.arange(0, BLOCK_Q)
    l = tl.arange(0, BLOCK_L)
    at, mask = tile_at(head, q, Q, l, K_L)
    slots = tl.load(indices_ptr + at, mask=mask, other=-1)
    sums = tl.zeros([BLOCK_Q, BLOCK_L], acc)
    first = slots >= 0
    for row in range(Q):
        row_slots = tl.load(indices_ptr + (head * Q + row) * K_L + l, mask=l < K_L, other=-1)
        row_values = tl.load(values_ptr + (head * Q + row) * K_L + l, mask=l < K_L, other=0.0).to(acc)
        weight = tl.load(read_weights_ptr + head * Q + row).to(acc)
        contributions = _rounded(weight * row_values, values_ptr)
        match = (slots[:, :, None] == row_slots[None, None, :]) & (row_slots >= 0)[None, None, :]
        added = tl.sum(tl.where(match, contributions[None, None, :], 0.0), 2)
        hit = tl.max(match.to(tl.int32), 2) > 0
        sums = tl.where(hit, _rounded(sums + added, values_ptr), sums)
        first = first & ~(hit & (q[:, None] > row))
    key = tl.where(first & (sums > 0), sums, float("-inf"))
    # top k in k rounds over the [BLOCK_Q, BLOCK_L] candidates (distinct slots at first places)
    position = tl.arange(0, BLOCK_K)
    top_values = tl.zeros([BLOCK_K], acc)
    top_slots = tl.full([BLOCK_K], -1, tl.int64)
    for m in range(k):
        top = tl.max(tl.max(key, 1), 0)
        top_slot = tl.min(tl.min(tl.where(key == top, slots, LAST_SLOT), 1), 0)
        found = top > float("-inf")
        top_values = tl.where(position == m, tl.where(found, top, 0.0), top_values)
        top_slots = tl.where(position == m, tl.where(found, top_slot, -1), top_slots)
        key = tl.where(slots == top_slot, float("-inf"), key)
    tl.store(out_weights_ptr + head * k + position, top_values, mask=position < k)
    tl.store(out_slots_ptr + head * k + position, top_slots, mask=position < k)


@triton.jit
def sparse_temporal_reads_kernel(
    read_weights_ptr,
    forward_indices_ptr,
    forward_values_ptr,
    backward_indices_ptr,
    backward_values_ptr,
    forward_weights_ptr,
    forward_slots_ptr,
    backward_weights_ptr,
    backward_slots_ptr,
    Q,
    K_L,
    k,
    BLOCK_Q: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # One program per head: f = L w from the backward store's rows, b = L^T w from the forward store's.
    head = tl.program_id(0)
    _reads_through(
        read_weights_ptr, backward_indices_ptr, backward_values_ptr, forward_weights_ptr, forward_slots_ptr,
        head, Q, K_L, k, BLOCK_Q, BLOCK_L, BLOCK_K,
    )  # fmt: skip
    _reads_through(
        read_weights_ptr, forward_indices_ptr, forward_values_ptr, backward_weights_ptr, backward_slots_ptr,
        head, Q, K_L, k, BLOCK_Q, BLOCK_L, BLOCK_K,
    )  # fmt: skip


def sparse_temporal_reads_forward(
    read_weights: Tensor,
    forward_indices: Tensor,
    forward_values: Tensor,
    backward_indices: Tensor,
    backward_values: Tensor,
    k: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    read_weights, forward_indices, forward_values, backward_indices, backward_values = contiguous(
        read_weights, forward_indices, forward_values, backward_indices, backward_values
    )
    B, R, Q, K_L = forward_indices.shape
    forward_weights = torch.empty(B, R, k, dtype=read_weights.dtype, device=read_weights.device)
    forward_slots = torch.empty(B, R, k, dtype=torch.int64, device=read_weights.device)
    backward_weights, backward_slots = torch.empty_like(forward_weights), torch.empty_like(forward_slots)
    if B * R > 0:
        sparse_temporal_reads_kernel[(B * R,)](
            read_weights, forward_indices, forward_values, backward_indices, backward_values, forward_weights,
            forward_slots, backward_weights, backward_slots, Q, K_L, k,
            BLOCK_Q=pow2(Q), BLOCK_L=pow2(K_L), BLOCK_K=pow2(k),
        )  # fmt: skip
    return forward_weights, forward_slots, backward_weights, backward_slots


@triton.jit
def _reads_through_backward(
    read_weights_ptr,
    values_ptr,
    indices_ptr,
    kept_slots_ptr,
    grad_kept_ptr,
    grad_values_ptr,
    head,
    Q,
    K_L,
    k,
    BLOCK_Q: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # A kept slot s with grad g: each contribution w_q v_ql at s gets g w_q into v_ql and g v_ql
    # into w_q. Registers: the head's contributions [BLOCK_Q, BLOCK_L] against the kept [BLOCK_K].
    acc: tl.constexpr = tl.float64 if values_ptr.dtype.element_ty == tl.float64 else tl.float32
    q = tl.arange(0, BLOCK_Q)
    l = tl.arange(0, BLOCK_L)
    m = tl.arange(0, BLOCK_K)
    at, mask = tile_at(head, q, Q, l, K_L)
    slots = tl.load(indices_ptr + at, mask=mask, other=-1)
    values = tl.load(values_ptr + at, mask=mask, other=0.0).to(acc)
    weights = tl.load(read_weights_ptr + head * Q + q, mask=q < Q, other=0.0).to(acc)
    kept = tl.load(kept_slots_ptr + head * k + m, mask=m < k, other=-1)
    grad_kept = tl.load(grad_kept_ptr + head * k + m, mask=m < k, other=0.0).to(acc)
    hit = (slots[:, :, None] == kept[None, None, :]) & (slots >= 0)[:, :, None]
    grad = tl.sum(tl.where(hit, grad_kept[None, None, :], 0.0), 2)
    tl.store(grad_values_ptr + at, grad * weights[:, None], mask=mask)
    return tl.sum(grad * values, 1)


@triton.jit
def sparse_temporal_reads_backward_kernel(
    read_weights_ptr,
    forward_indices_ptr,
    forward_values_ptr,
    backward_indices_ptr,
    backward_values_ptr,
    forward_slots_ptr,
    backward_slots_ptr,
    grad_forward_weights_ptr,
    grad_backward_weights_ptr,
    grad_read_weights_ptr,
    grad_forward_values_ptr,
    grad_backward_values_ptr,
    Q,
    K_L,
    k,
    BLOCK_Q: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # One program per head; the grad of its read weights [BLOCK_Q] sums both directions.
    head = tl.program_id(0)
    grad_weights = _reads_through_backward(
        read_weights_ptr, backward_values_ptr, backward_indices_ptr, forward_slots_ptr, grad_forward_weights_ptr,
        grad_backward_values_ptr, head, Q, K_L, k, BLOCK_Q, BLOCK_L, BLOCK_K,
    )  # fmt: skip
    grad_weights += _reads_through_backward(
        read_weights_ptr, forward_values_ptr, forward_indices_ptr, backward_slots_ptr, grad_backward_weights_ptr,
        grad_forward_values_ptr, head, Q, K_L, k, BLOCK_Q, BLOCK_L, BLOCK_K,
    )  # fmt: skip
    q = tl.arange(0, BLOCK_Q)
    tl.store(grad_read_weights_ptr + head * Q + q, grad_weights, mask=q < Q)


def sparse_temporal_reads_backward(grads: list[Tensor], inputs: list[Tensor], outputs: list[Tensor]) -> list[Tensor]:
    """grads [grad_forward_weights, grad_backward_weights] -> [grad_read_weights, grad_forward_values,
    grad_backward_values]."""
    read_weights, forward_indices, forward_values, backward_indices, backward_values = contiguous(*inputs[:5])
    grad_forward, grad_backward = contiguous(*grads)
    forward_slots, backward_slots = contiguous(outputs[1], outputs[3])
    B, R, Q, K_L = forward_indices.shape
    k = forward_slots.shape[-1]
    acc = accumulator_dtype(read_weights.dtype)
    grad_read_weights = torch.empty(read_weights.shape, dtype=acc, device=read_weights.device)
    grad_forward_values = torch.empty(forward_values.shape, dtype=acc, device=read_weights.device)
    grad_backward_values = torch.empty(backward_values.shape, dtype=acc, device=read_weights.device)
    if B * R > 0:
        sparse_temporal_reads_backward_kernel[(B * R,)](
            read_weights, forward_indices, forward_values, backward_indices, backward_values, forward_slots,
            backward_slots, grad_forward, grad_backward, grad_read_weights, grad_forward_values,
            grad_backward_values, Q, K_L, k, BLOCK_Q=pow2(Q), BLOCK_L=pow2(K_L), BLOCK_K=pow2(k),
        )  # fmt: skip
    dtype = read_weights.dtype
    return [grad_read_weights.to(dtype), grad_forward_values.to(dtype), grad_backward_values.to(dtype)]
