"""SDNC (Rae et al. 2016): SAM's memory plus DNC temporal links kept sparse.

The dense specification (sdnc_link_update_ref, sdnc_temporal_reads_ref, sdnc_step_ref)
keeps one link matrix L (L[i, j]: i was written after j). After DNC's update it keeps an
entry only if it is positive and among the K_L largest of its row AND of its column
("mutual top-K_L"; ties go to the lower index). So every row and every column of L holds
at most K_L entries, and the backward link matrix is exactly L^T: the sparse path stores
the rows of L (forward store) and the rows of L^T (backward store) with K_L entries each,
and the two stay exact transposes of each other. Why both, and why mutual:

- reads: with R*3K read slots, f = L w = sum_q w_q L[:, q] is a sum of ROWS of the
  backward store and b = L^T w a sum of rows of the forward store: O(R*3K*K_L) work,
  never a scan over the stored rows;
- update: L[i, j] = (1 - w_i - w_j) L[i, j] + w_i p_j changes the written rows i, the
  entries at written columns j (found as the backward store's rows at the written
  slots), and can evict entries from the columns j in precedence (which gain entries;
  found as the backward store's rows at those slots). A per-row-only cut would leave
  the columns unbounded and the transpose inexact, so the update would have to visit
  every stored row (the old design: O(S*K_L) work and saved memory per step, S the
  slots ever written).

With K_L = N nothing is cut (except exact zeros): L is link_update_ref's matrix. The
functional ops sparse_link_update_ref and sparse_temporal_reads_ref compute the same on
gathered rows (K_L (index, value) pairs per row, index -1 for empty); with all rows
gathered they equal the dense functions (tests/memory/test_sdnc.py).

One step, in order:
1. SAM's LRU, write weights and write (reference/sam.py);
2. L and precedence from w^W_t (sdnc_link_update_ref);
3. forward f = L w^R_{t-1}, backward b = L^T w^R_{t-1}, each cut to its top K per head;
4. content c: the top-K softmax read of SAM on M_t;
5. w^R = pi_0 b + pi_1 c + pi_2 f (DNC's read modes), r = M_t^T w^R;
6. SAM's usage (last access) from w^W_t and w^R_t.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsemem.reference.sam import (
    access_update_ref,
    lru_ref,
    sam_write_ref,
    sam_write_weights_ref,
    sequence_content_ref,
    sequence_read_ref,
    sequence_ref,
    sequence_stamps_ref,
    sequence_write_ref,
    topk_read_ref,
)


def _topk_mask(x: Tensor, k: int) -> Tensor:
    """The k largest positive entries of x along the last dimension (ties: lower index first)."""
    order = x.detach().sort(dim=-1, descending=True, stable=True).indices
    positions = torch.arange(x.shape[-1], device=x.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)
    return (rank < k) & (x > 0)


def keep_topk_ref(x: Tensor, k: int) -> Tensor:
    """x with all but its k largest positive entries along the last dimension set to 0.

    Ties go to the lower index, so every backend keeps the same entries.
    """
    return x * _topk_mask(x, k)


def sdnc_link_update_ref(link: Tensor, precedence: Tensor, write_w: Tensor, link_k: int) -> tuple[Tensor, Tensor]:
    """The link matrix and precedence after a write, cut to K_L entries per row and per column.

    L[i, j] = (1 - w[i] - w[j]) L[i, j] + w[i] p[j] with a zero diagonal, then an entry is kept
    if it is positive and among the K_L largest of both its row and its column; p = (1 - sum w) p + w,
    then its K_L largest positive entries. link [B, N, N], precedence [B, N], write_w [B, N]
    -> (link, precedence). The backward link matrix is link^T.
    """
    w_i = write_w.unsqueeze(-1)
    w_j = write_w.unsqueeze(-2)
    off_diagonal = 1 - torch.eye(link.shape[-1], dtype=link.dtype, device=link.device)
    link = ((1 - w_i - w_j) * link + w_i * precedence.unsqueeze(-2)) * off_diagonal
    kept = _topk_mask(link, link_k) & _topk_mask(link.transpose(1, 2), link_k).transpose(1, 2)
    precedence = (1 - write_w.sum(-1, keepdim=True)) * precedence + write_w
    return link * kept, keep_topk_ref(precedence, link_k)


def sdnc_temporal_reads_ref(link: Tensor, read_w: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """f = L w^R and b = L^T w^R, each cut to its K largest positive entries per head.

    link [B, N, N], read_w [B, R, N] -> (forward [B, R, N], backward [B, R, N]).
    """
    forward = read_w @ link.transpose(1, 2)
    backward = read_w @ link
    return keep_topk_ref(forward, k), keep_topk_ref(backward, k)


# --- the same on gathered rows: the references of sm.ops.sparse_link_update / sparse_temporal_reads


def _top(indices: Tensor, values: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest entries with index >= 0 and value > 0, ordered by (value desc, index asc),
    then empties (-1, 0): [..., C] -> [..., k]."""
    if indices.shape[-1] < k:
        pad = (*indices.shape[:-1], k - indices.shape[-1])
        indices = torch.cat([indices, indices.new_full(pad, -1)], dim=-1)
        values = torch.cat([values, values.new_zeros(pad)], dim=-1)
    valid = (indices >= 0) & (values > 0)
    key = torch.where(valid, values.detach(), -1)
    # a stable sort by value after one by index puts equal values in index order
    order = indices.sort(dim=-1, stable=True).indices
    order = order.gather(-1, key.gather(-1, order).sort(dim=-1, descending=True, stable=True).indices)[..., :k]
    valid = valid.gather(-1, order)
    return indices.gather(-1, order).masked_fill(~valid, -1), torch.where(valid, values.gather(-1, order), 0)


def _sum_duplicates(indices: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """Each distinct index >= 0 once with its values summed; the other places (-1, 0): [..., C]."""
    indices, order = indices.sort(dim=-1, stable=True)
    first = torch.ones_like(indices, dtype=torch.bool)
    first[..., 1:] = indices[..., 1:] != indices[..., :-1]
    group = first.long().cumsum(-1) - 1
    distinct = torch.full_like(indices, -1).scatter(-1, group, indices)
    sums = torch.zeros_like(values).scatter_add(-1, group, values.gather(-1, order))
    return distinct, torch.where(distinct >= 0, sums, 0)


def _lookup(keys: Tensor, values: Tensor, queries: Tensor) -> Tensor:
    """values[..., m] where keys[..., m] == queries[..., q] >= 0, else 0; keys distinct (or -1).

    keys, values [B, M] (values may carry trailing dimensions [B, M, ...]); queries [B, ...].
    """
    keys, order = keys.sort(dim=-1)
    flat = queries.reshape(queries.shape[0], -1).contiguous()
    positions = torch.searchsorted(keys, flat).clamp(max=keys.shape[-1] - 1)
    hit = (keys.gather(-1, positions) == flat) & (flat >= 0)
    rows = order.gather(-1, positions)
    tail = values.shape[2:]
    found = values.gather(1, rows.view(*rows.shape, *[1] * len(tail)).expand(*rows.shape, *tail))
    found = torch.where(hit.view(*hit.shape, *[1] * len(tail)), found, 0)
    return found.view(*queries.shape, *tail)


def _with_new(indices: Tensor, values: Tensor, new_indices: Tensor, new_values: Tensor, slots: Tensor | None = None):
    """A row's stored entries [..., K_L] plus new ones [..., E] at indices not stored yet (and, for
    link rows, off the diagonal: new index != the row's slot) -> candidates [..., K_L + E]."""
    fresh = (new_indices >= 0) & ~(new_indices.unsqueeze(-1) == indices.unsqueeze(-2)).any(-1)
    if slots is not None:
        fresh &= new_indices != slots.unsqueeze(-1)
    return torch.cat([indices, new_indices.masked_fill(~fresh, -1)], -1), torch.cat([values, new_values * fresh], -1)


def _passes(slots: Tensor, entries: Tensor, other_slots: Tensor, other_top: Tensor) -> Tensor:
    """Entry (slot s, index e) passes the cut of the other store's row e: e has no row there
    (no new entries, so at most K_L) or s is among that row's top K_L. [B, S, K_L] bool."""
    batch = slots.shape[0]
    tops = _lookup(other_slots, other_top + 1, entries) - 1  # [B, S, K_L, K_L]; -1 where e has no row
    found = _lookup(other_slots, torch.ones_like(other_slots), entries).bool()
    return ~found | (tops == slots.view(batch, -1, 1, 1)).any(-1)


def sparse_link_update_ref(
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
    """sdnc_link_update_ref on gathered rows; see sparsemem.ops.sparse_link_update for the contract.

    Forward row i (slot i of L), entry j: (1 - w_i - w_j) L[i, j] + w_i p_j, plus new entries
    w_i p_j at the precedence slots j != i not stored yet. Backward row j (column j of L), entry i:
    the same value, plus new entries w_i p_j at the written slots i != j. Each row keeps its K_L
    largest positive candidates, then an entry is dropped if the other store's row (its column,
    resp. its row of L) has its own top K_L without it. Precedence: (1 - sum w) p + w, top K_L.
    """
    link_k = forward_indices.shape[-1]
    write_weights = torch.where(write_indices >= 0, write_weights, 0)
    written, written_w = _sum_duplicates(write_indices, write_weights)

    def w(slots: Tensor) -> Tensor:
        return _lookup(written, written_w, slots)

    def p(slots: Tensor) -> Tensor:
        return _lookup(precedence_indices, precedence_values, slots)

    # one expression for an entry (row i, column j) of L on both sides, so both stores get equal bits
    def entry(value: Tensor, w_row: Tensor, w_column: Tensor, p_column: Tensor) -> Tensor:
        return value * (1 - w_row - w_column) + w_row * p_column

    w_i = w(forward_slots).unsqueeze(-1)
    forward = _with_new(
        forward_indices,
        entry(forward_values, w_i, w(forward_indices), p(forward_indices)),
        precedence_indices.unsqueeze(1).expand(-1, forward_slots.shape[1], -1),
        w_i * precedence_values.unsqueeze(1),
        forward_slots,
    )
    w_j, p_j = w(backward_slots).unsqueeze(-1), p(backward_slots).unsqueeze(-1)
    w_rows = w(backward_indices)
    backward = _with_new(
        backward_indices,
        entry(backward_values, w_rows, w_j, p_j),
        written.unsqueeze(1).expand(-1, backward_slots.shape[1], -1),
        written_w.unsqueeze(1) * p_j,
        backward_slots,
    )
    forward, backward = _top(*forward, link_k), _top(*backward, link_k)
    forward_kept = _passes(forward_slots, forward[0], backward_slots, backward[0])
    backward_kept = _passes(backward_slots, backward[0], forward_slots, forward[0])
    forward_indices, forward_values = _top(forward[0].masked_fill(~forward_kept, -1), forward[1], link_k)
    backward_indices, backward_values = _top(backward[0].masked_fill(~backward_kept, -1), backward[1], link_k)

    total = write_weights.sum(-1, keepdim=True)
    precedence = _with_new(
        precedence_indices, (1 - total) * precedence_values + w(precedence_indices), written, written_w
    )
    precedence_indices, precedence_values = _top(*precedence, link_k)
    return forward_values, forward_indices, backward_values, backward_indices, precedence_values, precedence_indices


def sparse_temporal_reads_ref(
    read_weights: Tensor,
    forward_indices: Tensor,
    forward_values: Tensor,
    backward_indices: Tensor,
    backward_values: Tensor,
    k: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """sdnc_temporal_reads_ref on gathered rows; see sparsemem.ops.sparse_temporal_reads.

    f = L w = sum_q w_q L_b[q, :] (rows of the backward store), b = L^T w = sum_q w_q L[q, :]
    (rows of the forward store); entries of equal slots add up; each keeps its top K.
    """
    batch, heads, reads, link_k = forward_indices.shape

    def through(indices: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        contributions = (read_weights.unsqueeze(-1) * values).reshape(batch, heads, reads * link_k)
        slots, weights = _top(*_sum_duplicates(indices.reshape(batch, heads, reads * link_k), contributions), k)
        return weights, slots

    return (*through(backward_indices, backward_values), *through(forward_indices, forward_values))


def sdnc_step_ref(
    memory: Tensor,
    last_access: Tensor,
    prev_read_w: Tensor,
    link: Tensor,
    precedence: Tensor,
    keys: Tensor,
    strengths: Tensor,
    add: Tensor,
    write_gate: Tensor,
    interp_gate: Tensor,
    read_modes: Tensor,
    k: int,
    link_k: int,
    step: int,
) -> tuple[Tensor, ...]:
    """One SDNC step; read_modes [B, R, 3] (backward, content, forward; rows sum to 1).

    -> (reads [B, R, W], read_w [B, R, N], write_w [B, N], memory, last_access, link, precedence).
    """
    lru = lru_ref(last_access)
    write_w = sam_write_weights_ref(prev_read_w, lru, write_gate, interp_gate)
    memory = sam_write_ref(memory, write_w, lru, add)
    link, precedence = sdnc_link_update_ref(link, precedence, write_w, link_k)
    forward, backward = sdnc_temporal_reads_ref(link, prev_read_w, k)
    content, _ = topk_read_ref(memory, keys, strengths, k)
    modes = read_modes.unsqueeze(-1)
    read_w = modes[:, :, 0] * backward + modes[:, :, 1] * content + modes[:, :, 2] * forward
    reads = read_w @ memory
    last_access = access_update_ref(last_access, write_w, read_w, step)
    return reads, read_w, write_w, memory, last_access, link, precedence


def _entries(link_idx: Tensor, slots: Tensor) -> Tensor:
    """The stored entries' slots of the link rows at slots [B, S] (-1: none) of link_idx [B, 2N, K_L]
    -> [B, S * K_L] (-1 where the row is -1 or the place empty)."""
    rows = link_idx.gather(1, slots.clamp(min=0).unsqueeze(-1).expand(-1, -1, link_idx.shape[2]))
    return rows.masked_fill((slots < 0).unsqueeze(-1), -1).flatten(1)


def linkable_rows_ref(link_idx: Tensor, precedence_idx: Tensor, write_idx: Tensor) -> Tensor:
    """The rows a link update from w^W on write_idx [B, J] can change (sparse_link_update's contract):
    forward rows (ids s < N) at the written slots W and the entries of the backward rows of W and of the
    precedence slots P; backward rows (ids N + s) at W, P and the entries of the forward rows of W.
    link_idx [B, 2N, K_L], precedence_idx [B, K_L] (-1: none) -> [B, 2N] bool."""
    B, N = link_idx.shape[0], link_idx.shape[1] // 2

    def mask(slots: Tensor) -> Tensor:  # slot -1 lands in the extra column, cut
        return torch.zeros(B, N + 1, dtype=torch.bool).scatter(-1, slots % (N + 1), True)[:, :N]

    written_or_precedent = torch.cat([write_idx, precedence_idx], -1)
    forward = mask(
        torch.cat(
            [write_idx, _entries(link_idx, torch.where(written_or_precedent >= 0, written_or_precedent + N, -1))], -1
        )
    )
    backward = mask(torch.cat([written_or_precedent, _entries(link_idx, write_idx)], -1))
    return torch.cat([forward, backward], -1)


def sdnc_sequence_ref(
    gates_x: Tensor,
    hidden: Tensor,
    cell: Tensor,
    reads: Tensor,
    memory: Tensor,
    last_access: Tensor,
    written: Tensor,
    read_idx: Tensor,
    read_w: Tensor,
    write_idx: Tensor,
    write_w: Tensor,
    link_idx: Tensor,
    link_w: Tensor,
    precedence_idx: Tensor,
    precedence_w: Tensor,
    weight_rh: Tensor,
    weight_if: Tensor,
    bias_if: Tensor,
    active: Tensor,
    clock: int,
) -> tuple[Tensor, ...]:
    """T steps of an SDNC whose controller is an LSTM cell: what sparsemem.models.SDNC runs each step,
    on a dense memory, with the weights and the links as the sparse state keeps them.

    As reference/sam.py's sam_sequence_ref (its arguments and outputs first), with the interface split
    as SDNCMemory.split_interface (SAM's parts, then read modes: a softmax over 3 per head) and steps
    1-6 of this module's docstring: the links updated on every row by sparse_link_update_ref, the
    temporal reads by sparse_temporal_reads_ref through the rows at the last step's read slots (empty
    places: slot 0, weight 0), the read weights (backward, content, forward) on 3K places per head.
    read_idx, read_w [B, R, 3K]; write_idx, write_w [B, J] with J = 3 R K + 1; link_idx, link_w
    [B, 2N, K_L]: rows s < N are rows of L (the forward store), rows N + s rows of L^T (the backward
    store), K_L (slot, value) pairs each ordered by (value desc, slot asc), slot -1 (value 0) for an
    empty place; precedence_idx, precedence_w [B, K_L] likewise; I = R*W + R + W + 2 + 3R.
    -> (hidden, reads, cell, memory, last_access, read_idx, read_w, write_idx, write_w, written_now,
    link_idx, link_w, precedence_idx, precedence_w, linked_now [B, 2N] bool: the rows that the
    call's updates could change, linkable_rows_ref; only those can differ from the input's).
    """
    B, N = memory.shape[:2]
    R, W, K = reads.shape[1], reads.shape[2], read_idx.shape[2] // 3
    slots = torch.arange(N).expand(B, N)

    def memory_step(interface: Tensor, state: tuple[Tensor, ...], t: int) -> tuple[Tensor, tuple[Tensor, ...]]:
        memory, last_access, read_idx, read_w, _, _, written_now, link_idx, link_w, *precedence, linked_now = state
        keys, strengths, add, gates, modes = interface.split([R * W, R, W, 2, 3 * R], dim=-1)
        keys, strengths, gates = keys.view(B, R, W), 1 + F.softplus(strengths), torch.sigmoid(gates)
        modes = torch.softmax(modes.view(B, R, 3), dim=-1)
        memory, dense_write_w, write_idx, write_w = sequence_write_ref(
            memory, last_access, read_idx, read_w, add, gates[:, 0], gates[:, 1]
        )
        linked_now = linked_now | linkable_rows_ref(link_idx, precedence[0], write_idx)
        forward_store, backward_store = (link_idx[:, :N], link_w[:, :N]), (link_idx[:, N:], link_w[:, N:])
        fv, fi, gv, gi, precedence_w, precedence_idx = sparse_link_update_ref(
            slots, *forward_store, slots, *backward_store, *precedence, write_idx, write_w
        )
        link_idx, link_w = torch.cat([fi, gi], 1), torch.cat([fv, gv], 1)

        def rows(store: Tensor, offset: int) -> Tensor:  # the link rows at the last step's read slots
            places = (read_idx.flatten(1) + offset).unsqueeze(-1).expand(-1, -1, store.shape[2])
            return store.gather(1, places).view(*read_idx.shape, -1)

        forward_w, forward_idx, backward_w, backward_idx = sparse_temporal_reads_ref(
            read_w, rows(link_idx, 0), rows(link_w, 0), rows(link_idx, N), rows(link_w, N), K
        )
        content_idx, content_w = sequence_content_ref(memory, keys, strengths, K)
        read_idx = torch.cat([backward_idx.clamp(min=0), content_idx, forward_idx.clamp(min=0)], -1)
        read_w = torch.cat([modes[..., :1] * backward_w, modes[..., 1:2] * content_w, modes[..., 2:] * forward_w], -1)
        last_access, written_now = sequence_stamps_ref(
            last_access, written_now, dense_write_w, read_idx, read_w, write_idx, clock + t + 1
        )
        links = (link_idx, link_w, precedence_idx, precedence_w, linked_now)
        state = (memory, last_access, read_idx, read_w, write_idx, write_w, written_now, *links)
        return sequence_read_ref(memory, read_idx, read_w), state

    links = (link_idx, link_w, precedence_idx, precedence_w, torch.zeros(B, 2 * N, dtype=torch.bool))
    state = (memory, last_access, read_idx, read_w, write_idx, write_w, torch.zeros_like(written), *links)
    return sequence_ref(gates_x, hidden, cell, reads, weight_rh, weight_if, bias_if, active, state, memory_step)
