"""SAM (Rae et al. 2016), dense: the specification the sparse memory is checked against.

Everything here is [B, N]-dense and plain PyTorch; sparsemem.memory.SAMMemory computes the
same step touching only O(R*K) rows. One step, in order:

1. the least recently used slot I^U = argmin of the last access time (lowest slot on ties);
2. write weights w^W = alpha (gamma mean_r w^R_{t-1} + (1 - gamma) I^U);
3. write: the LRU row is erased wholly, then w^W a^T is added: M_t = M (1 - I^U 1^T) + w^W a^T;
4. read: per head the top-K slots by cosine similarity on M_t, softmax over those K only;
5. usage: a slot is accessed at step t when w^W(i) + sum_r w^R_r(i) > DELTA.
"""

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsemem._constants import DELTA
from sparsemem.reference.dnc import cosine_similarity_ref, lstm_cell_ref, rows_where


def lru_ref(last_access: Tensor) -> Tensor:
    """The least recently used slot: last_access [B, N] (step of the last access, 0 = never) -> [B].

    torch.argmin returns the first minimum, so ties go to the lowest slot id.
    """
    return torch.argmin(last_access, dim=-1)


def sam_write_weights_ref(prev_read_w: Tensor, lru: Tensor, write_gate: Tensor, interp_gate: Tensor) -> Tensor:
    """w^W = alpha (gamma w^R_{t-1} + (1 - gamma) I^U), w^R_{t-1} the mean over the R heads.

    prev_read_w [B, R, N], lru [B], write_gate alpha [B], interp_gate gamma [B] -> [B, N].
    The mean keeps w^W a distribution scaled by alpha whatever R is.
    """
    one_hot = torch.nn.functional.one_hot(lru, prev_read_w.shape[-1]).to(prev_read_w.dtype)
    gamma = interp_gate.unsqueeze(-1)
    return write_gate.unsqueeze(-1) * (gamma * prev_read_w.mean(1) + (1 - gamma) * one_hot)


def sam_write_ref(memory: Tensor, write_w: Tensor, lru: Tensor, add: Tensor) -> Tensor:
    """M_t = M (1 - I^U 1^T) + w^W a^T: the LRU row erased wholly, no learned erase vector.

    memory [B, N, W], write_w [B, N], lru [B], add [B, W] -> [B, N, W].
    """
    erase = torch.nn.functional.one_hot(lru, memory.shape[1]).to(memory.dtype).unsqueeze(-1)
    return memory * (1 - erase) + write_w.unsqueeze(-1) * add.unsqueeze(1)


def topk_read_ref(memory: Tensor, keys: Tensor, strengths: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Content read restricted to the top-K slots per head, as dense weights.

    w^R[i] = softmax over the K most similar slots of b D(key, M[i]), 0 elsewhere.
    memory [B, N, W], keys [B, R, W], strengths [B, R] -> (read_w [B, R, N], reads [B, R, W]).
    With K = N this is content_read_ref.
    """
    similarity = cosine_similarity_ref(memory, keys)
    top = torch.topk(similarity, k, dim=-1).indices
    outside = torch.ones_like(similarity, dtype=torch.bool).scatter(-1, top, False)
    logits = (strengths.unsqueeze(-1) * similarity).masked_fill(outside, float("-inf"))
    read_w = torch.softmax(logits, dim=-1)
    return read_w, read_w @ memory


def access_update_ref(last_access: Tensor, write_w: Tensor, read_w: Tensor, step: int) -> Tensor:
    """last_access[i] = step where w^W(i) + sum_r w^R_r(i) > DELTA, else unchanged.

    last_access [B, N] int64, write_w [B, N], read_w [B, R, N], step >= 1 -> [B, N].
    """
    accessed = write_w + read_w.sum(1) > DELTA
    return torch.where(accessed, torch.full_like(last_access, step), last_access)


def sam_step_ref(
    memory: Tensor,
    last_access: Tensor,
    prev_read_w: Tensor,
    keys: Tensor,
    strengths: Tensor,
    add: Tensor,
    write_gate: Tensor,
    interp_gate: Tensor,
    k: int,
    step: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One SAM step -> (reads [B, R, W], read_w [B, R, N], write_w [B, N], memory, last_access)."""
    lru = lru_ref(last_access)
    write_w = sam_write_weights_ref(prev_read_w, lru, write_gate, interp_gate)
    memory = sam_write_ref(memory, write_w, lru, add)
    read_w, reads = topk_read_ref(memory, keys, strengths, k)
    last_access = access_update_ref(last_access, write_w, read_w, step)
    return reads, read_w, write_w, memory, last_access


def sequence_ref(
    gates_x: Tensor,
    hidden: Tensor,
    cell: Tensor,
    reads: Tensor,
    weight_rh: Tensor,
    weight_if: Tensor,
    bias_if: Tensor,
    active: Tensor,
    state: tuple[Tensor, ...],
    memory_step: Callable[[Tensor, tuple[Tensor, ...], int], tuple[Tensor, tuple[Tensor, ...]]],
) -> tuple[Tensor, ...]:
    """The recurrence of sam_sequence_ref and reference/sdnc.py's sdnc_sequence_ref: per step t,
    h_t, c_t = lstm_cell_ref(gates_x[t], r_{t-1}, h_{t-1}, c_{t-1}), then
    memory_step(h_t weight_if^T + bias_if, state, t) -> (r_t, state); a row whose active[t] is False
    (padding) keeps all of it (hidden, cell, reads and every part of the memory's state).
    -> (hidden [T, B, H], reads [T, B, R, W] (every step's), cell [B, H], *state after step T).
    """
    hiddens, every_reads = [], []
    for t, (gates_t, active_t) in enumerate(zip(gates_x.unbind(0), active.unbind(0), strict=True)):
        kept = functools.partial(rows_where, active_t)
        new_hidden, new_cell = lstm_cell_ref(gates_t, reads, hidden, cell, weight_rh)
        new_reads, new_state = memory_step(new_hidden @ weight_if.T + bias_if, state, t)
        hidden, cell, reads = kept(new_hidden, hidden), kept(new_cell, cell), kept(new_reads, reads)
        state = tuple(kept(new, old) for new, old in zip(new_state, state, strict=True))
        hiddens.append(hidden)
        every_reads.append(reads)
    return torch.stack(hiddens), torch.stack(every_reads), cell, *state


def sequence_write_ref(
    memory: Tensor, last_access: Tensor, read_idx: Tensor, read_w: Tensor, add: Tensor, alpha: Tensor, gamma: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Steps 1-3 on a dense memory from the last step's sparse read weights read_idx, read_w [B, R, Q]
    -> (memory, the write weights dense [B, N] and as J = R Q + 1 entries (slots, weights [B, J]):
    one per (head, place) and the LRU slot)."""
    B, R, N = memory.shape[0], read_idx.shape[1], memory.shape[1]
    lru = lru_ref(last_access)
    previous = torch.zeros(B, R, N, dtype=read_w.dtype).scatter_add(-1, read_idx, read_w)
    dense_write_w = sam_write_weights_ref(previous, lru, alpha, gamma)
    write_idx = torch.cat([read_idx.flatten(1), lru.unsqueeze(-1)], dim=-1)
    write_w = torch.cat(
        [(alpha * gamma).unsqueeze(-1) * read_w.flatten(1) / R, (alpha * (1 - gamma)).unsqueeze(-1)], dim=-1
    )
    return sam_write_ref(memory, dense_write_w, lru, add), dense_write_w, write_idx, write_w


def sequence_content_ref(memory: Tensor, keys: Tensor, strengths: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Step 4 with the top K in a total order (score descending, then slot ascending)
    -> (slots, weights [B, R, K])."""
    similarity = cosine_similarity_ref(memory, keys)
    top = similarity.sort(dim=-1, descending=True, stable=True).indices[..., :k]
    return top, torch.softmax(strengths.unsqueeze(-1) * similarity.gather(-1, top), dim=-1)


def sequence_read_ref(memory: Tensor, read_idx: Tensor, read_w: Tensor) -> Tensor:
    """r = sum_q w_q M[slot_q] per head: read_idx, read_w [B, R, Q] -> [B, R, W]."""
    B, R, Q = read_idx.shape
    rows = memory.gather(1, read_idx.reshape(B, R * Q, 1).expand(-1, -1, memory.shape[2])).view(B, R, Q, -1)
    return (read_w.unsqueeze(-1) * rows).sum(2)


def sequence_stamps_ref(
    last_access: Tensor,
    written_now: Tensor,
    dense_write_w: Tensor,
    read_idx: Tensor,
    read_w: Tensor,
    write_idx: Tensor,
    step: int,
) -> tuple[Tensor, Tensor]:
    """Step 5, and the slots written so far in a call: -> (last_access, written_now)."""
    B, N = last_access.shape
    read_total = torch.zeros(B, N, dtype=read_w.dtype).scatter_add(-1, read_idx.flatten(1), read_w.flatten(1))
    accessed = (dense_write_w + read_total).detach() > DELTA
    wrote = torch.zeros_like(written_now).scatter(-1, write_idx, True)
    return torch.where(accessed, step, last_access), written_now | wrote


def sam_sequence_ref(
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
    weight_rh: Tensor,
    weight_if: Tensor,
    bias_if: Tensor,
    active: Tensor,
    clock: int,
) -> tuple[Tensor, ...]:
    """T steps of a SAM whose controller is an LSTM cell: what sparsemem.models.SAM runs each step,
    on a dense memory, with the read and write weights as the sparse state keeps them.

    Per step t (sequence_ref): h_t, c_t = lstm_cell_ref(gates_x[t], r_{t-1}, h_{t-1}, c_{t-1}); the
    interface h_t weight_if^T + bias_if split as SAMMemory.split_interface (keys, oneplus strengths,
    add, sigmoid write and interpolation gates); then steps 1-5 of this module's docstring, with the
    top K in a total order (score descending, then slot ascending) and the step's accesses stamped
    clock + t + 1. A row whose active[t] is False (padding) writes nothing, stamps nothing and keeps
    its state (hidden, cell, reads and the weights), as SAMMemory.step does.
    gates_x [T, B, 4H], hidden and cell [B, H], reads [B, R, W], memory [B, N, W] (a slot never
    written holds the zero word), last_access [B, N] int64 (0 = never accessed), written [B, N]
    bool (the slots written so far), read_idx and read_w [B, R, K] (the last step's read weights on
    their slots), write_idx and write_w [B, J] (J = R K + 1: the last step's write weights, one
    entry per (head, k) and the LRU slot), weight_rh [4H, R*W + H], weight_if [I, H], bias_if [I]
    (I = R*W + R + W + 2), active [T, B] bool, clock: the steps stamped before this call
    -> (hidden [T, B, H], reads [T, B, R, W] (every step's), cell [B, H], memory, last_access,
    read_idx, read_w, write_idx, write_w (the state after step T), written_now [B, N] bool: the
    slots this call wrote). written takes no part in the values: the fused kernel scans only
    written rows, every other one scoring D(key, 0) = 0.
    """
    B, R, W, K = reads.shape[0], reads.shape[1], reads.shape[2], read_idx.shape[2]

    def memory_step(interface: Tensor, state: tuple[Tensor, ...], t: int) -> tuple[Tensor, tuple[Tensor, ...]]:
        memory, last_access, read_idx, read_w, _, _, written_now = state
        keys, strengths, add, gates = interface.split([R * W, R, W, 2], dim=-1)
        keys, strengths, gates = keys.view(B, R, W), 1 + F.softplus(strengths), torch.sigmoid(gates)
        memory, dense_write_w, write_idx, write_w = sequence_write_ref(
            memory, last_access, read_idx, read_w, add, gates[:, 0], gates[:, 1]
        )
        read_idx, read_w = sequence_content_ref(memory, keys, strengths, K)
        last_access, written_now = sequence_stamps_ref(
            last_access, written_now, dense_write_w, read_idx, read_w, write_idx, clock + t + 1
        )
        state = (memory, last_access, read_idx, read_w, write_idx, write_w, written_now)
        return sequence_read_ref(memory, read_idx, read_w), state

    state = (memory, last_access, read_idx, read_w, write_idx, write_w, torch.zeros_like(written))
    return sequence_ref(gates_x, hidden, cell, reads, weight_rh, weight_if, bias_if, active, state, memory_step)
