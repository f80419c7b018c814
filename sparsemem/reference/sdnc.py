"""SDNC (Rae et al. 2016), dense: SAM's memory plus DNC temporal links kept sparse.

The forward link matrix L (L[i, j]: i was written after j) and the backward matrix L_b
(the transpose, stored on its own) are updated with DNC's rule and then cut to their K_L
largest entries per row; precedence is cut to its K_L largest entries. With K_L = N
nothing is cut: L is link_update_ref's matrix and L_b its transpose. One step, in order:

1. SAM's LRU, write weights and write (reference/sam.py);
2. L, L_b and precedence from w^W_t (sparse_link_update_ref);
3. forward f = L w^R_{t-1}, backward b = L_b w^R_{t-1}, each cut to its top K per head;
4. content c: the top-K softmax read of SAM on M_t;
5. w^R = pi_0 b + pi_1 c + pi_2 f (DNC's read modes), r = M_t^T w^R;
6. SAM's usage (last access) from w^W_t and w^R_t.
"""

import torch
from torch import Tensor

from sparsemem.reference.sam import access_update_ref, lru_ref, sam_write_ref, sam_write_weights_ref, topk_read_ref


def keep_topk_ref(x: Tensor, k: int) -> Tensor:
    """x with all but its k largest entries along the last dimension set to 0."""
    top = torch.topk(x, k, dim=-1).indices
    return torch.zeros_like(x).scatter(-1, top, x.gather(-1, top))


def sparse_link_update_ref(
    link: Tensor, backward_link: Tensor, precedence: Tensor, write_w: Tensor, link_k: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Links and precedence after a write, each cut to K_L entries per row.

    L[i, j] = (1 - w[i] - w[j]) L[i, j] + w[i] p[j];  L_b[i, j] = (1 - w[i] - w[j]) L_b[i, j] + p[i] w[j];
    both with a zero diagonal; p = (1 - sum w) p + w.
    link, backward_link [B, N, N], precedence [B, N], write_w [B, N], link_k K_L
    -> (link, backward_link, precedence).
    """
    w_i = write_w.unsqueeze(-1)
    w_j = write_w.unsqueeze(-2)
    off_diagonal = 1 - torch.eye(link.shape[-1], dtype=link.dtype, device=link.device)
    link = ((1 - w_i - w_j) * link + w_i * precedence.unsqueeze(-2)) * off_diagonal
    backward_link = ((1 - w_i - w_j) * backward_link + precedence.unsqueeze(-1) * w_j) * off_diagonal
    precedence = (1 - write_w.sum(-1, keepdim=True)) * precedence + write_w
    return keep_topk_ref(link, link_k), keep_topk_ref(backward_link, link_k), keep_topk_ref(precedence, link_k)


def sparse_temporal_reads_ref(link: Tensor, backward_link: Tensor, read_w: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """f = L w^R and b = L_b w^R, each cut to its top K per head.

    link, backward_link [B, N, N], read_w [B, R, N] -> (forward [B, R, N], backward [B, R, N]).
    """
    forward = read_w @ link.transpose(1, 2)
    backward = read_w @ backward_link.transpose(1, 2)
    return keep_topk_ref(forward, k), keep_topk_ref(backward, k)


def sdnc_step_ref(
    memory: Tensor,
    last_access: Tensor,
    prev_read_w: Tensor,
    link: Tensor,
    backward_link: Tensor,
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

    -> (reads [B, R, W], read_w [B, R, N], write_w [B, N], memory, last_access,
        link, backward_link, precedence).
    """
    lru = lru_ref(last_access)
    write_w = sam_write_weights_ref(prev_read_w, lru, write_gate, interp_gate)
    memory = sam_write_ref(memory, write_w, lru, add)
    link, backward_link, precedence = sparse_link_update_ref(link, backward_link, precedence, write_w, link_k)
    forward, backward = sparse_temporal_reads_ref(link, backward_link, prev_read_w, k)
    content, _ = topk_read_ref(memory, keys, strengths, k)
    modes = read_modes.unsqueeze(-1)
    read_w = modes[:, :, 0] * backward + modes[:, :, 1] * content + modes[:, :, 2] * forward
    reads = read_w @ memory
    last_access = access_update_ref(last_access, write_w, read_w, step)
    return reads, read_w, write_w, memory, last_access, link, backward_link, precedence
