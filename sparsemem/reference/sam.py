"""SAM (Rae et al. 2016), dense: the specification the sparse memory is checked against.

Everything here is [B, N]-dense and plain PyTorch; sparsemem.memory.SAMMemory computes the
same step touching only O(R*K) rows. One step, in order:

1. the least recently used slot I^U = argmin of the last access time (lowest slot on ties);
2. write weights w^W = alpha (gamma mean_r w^R_{t-1} + (1 - gamma) I^U);
3. write: the LRU row is erased wholly, then w^W a^T is added: M_t = M (1 - I^U 1^T) + w^W a^T;
4. read: per head the top-K slots by cosine similarity on M_t, softmax over those K only;
5. usage: a slot is accessed at step t when w^W(i) + sum_r w^R_r(i) > DELTA.
"""

import torch
from torch import Tensor

from sparsemem._constants import DELTA
from sparsemem.reference.dnc import cosine_similarity_ref


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
