"""Dense DNC memory operations: the specification every fast path is tested against.

Each function is plain, differentiable PyTorch that works in any float dtype
(float64 for gradcheck). Shapes use the glossary of DESIGN.md: B batch, N slots,
W word size, R read heads. Clarity over speed: no in-place tricks, no fusion.
"""

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-6
"""Added to squared norms before the square root, so cosine similarity of a zero
word (a fresh memory) is 0 with a finite gradient."""


def safe_norm(x: Tensor) -> Tensor:
    """||x||_eps = sqrt(sum_w x_w^2 + EPS) over the last dimension."""
    return torch.sqrt((x * x).sum(-1) + EPS)


def cosine_similarity_ref(memory: Tensor, keys: Tensor) -> Tensor:
    """D(k_r, M_i) = k_r . M_i / (||k_r||_eps ||M_i||_eps).

    memory [B, N, W], keys [B, R, W] -> [B, R, N].
    """
    dots = keys @ memory.transpose(1, 2)
    return dots / (safe_norm(keys).unsqueeze(-1) * safe_norm(memory).unsqueeze(1))


def content_weights_ref(memory: Tensor, keys: Tensor, strengths: Tensor) -> Tensor:
    """C(M, k, b)[i] = softmax_i(b * D(k, M[i])).

    memory [B, N, W], keys [B, R, W], strengths [B, R] -> weights [B, R, N].
    """
    similarity = cosine_similarity_ref(memory, keys)
    return torch.softmax(strengths.unsqueeze(-1) * similarity, dim=-1)


def content_read_ref(memory: Tensor, keys: Tensor, strengths: Tensor) -> tuple[Tensor, Tensor]:
    """Content weights and the read vectors they give: (C(M, k, b), C(M, k, b) M).

    -> weights [B, R, N], reads [B, R, W].
    """
    weights = content_weights_ref(memory, keys, strengths)
    return weights, memory_read_ref(memory, weights)


def usage_update_ref(usage: Tensor, write_w: Tensor, read_w: Tensor, free_gates: Tensor) -> Tensor:
    """u_t = (u + w^w - u * w^w) * psi, with retention psi = prod_r (1 - f_r w^r).

    usage [B, N], write_w [B, N] (the previous step's write weights),
    read_w [B, R, N] (the previous step's read weights), free_gates [B, R] -> [B, N].
    """
    retention = torch.prod(1 - free_gates.unsqueeze(-1) * read_w, dim=1)
    return (usage + write_w - usage * write_w) * retention


def allocation_weights_ref(usage: Tensor) -> Tensor:
    """a[phi_j] = (1 - u[phi_j]) prod_{i<j} u[phi_i], phi = argsort(u) ascending.

    usage [B, N] -> [B, N]. Ties are broken by slot index (stable sort). The
    gradient flows through the exclusive cumulative product into the sorted
    usages, never through the permutation phi (the DNC convention).
    """
    sorted_usage, phi = torch.sort(usage, dim=-1, stable=True)
    ones = torch.ones_like(sorted_usage[..., :1])
    exclusive_product = torch.cumprod(torch.cat([ones, sorted_usage[..., :-1]], dim=-1), dim=-1)
    sorted_allocation = (1 - sorted_usage) * exclusive_product
    return torch.zeros_like(usage).scatter(-1, phi, sorted_allocation)


def memory_write_ref(memory: Tensor, write_w: Tensor, erase: Tensor, add: Tensor) -> Tensor:
    """M_t = M * (1 - w^w e^T) + w^w v^T.

    memory [B, N, W], write_w [B, N], erase [B, W] (in [0, 1]), add [B, W] -> [B, N, W].
    """
    write_w = write_w.unsqueeze(-1)
    return memory * (1 - write_w * erase.unsqueeze(1)) + write_w * add.unsqueeze(1)


def memory_read_ref(memory: Tensor, read_w: Tensor) -> Tensor:
    """r^r = M^T w^r.  memory [B, N, W], read_w [B, R, N] -> [B, R, W]."""
    return read_w @ memory


def link_update_ref(link: Tensor, precedence: Tensor, write_w: Tensor) -> tuple[Tensor, Tensor]:
    """Temporal link matrix and precedence after a write.

    L_t[i, j] = (1 - w[i] - w[j]) L[i, j] + w[i] p[j], with L_t[i, i] = 0;
    p_t = (1 - sum_i w[i]) p + w.
    link [B, N, N], precedence [B, N], write_w [B, N] -> (link [B, N, N], precedence [B, N]).
    """
    w_i = write_w.unsqueeze(-1)
    w_j = write_w.unsqueeze(-2)
    new_link = (1 - w_i - w_j) * link + w_i * precedence.unsqueeze(-2)
    off_diagonal = 1 - torch.eye(link.shape[-1], dtype=link.dtype, device=link.device)
    new_link = new_link * off_diagonal
    new_precedence = (1 - write_w.sum(-1, keepdim=True)) * precedence + write_w
    return new_link, new_precedence


def temporal_reads_ref(link: Tensor, read_w: Tensor) -> tuple[Tensor, Tensor]:
    """Forward f = L w^r and backward b = L^T w^r weightings.

    link [B, N, N], read_w [B, R, N] -> (forward [B, R, N], backward [B, R, N]).
    """
    forward = read_w @ link.transpose(1, 2)
    backward = read_w @ link
    return forward, backward


def link_update_reads_ref(
    link: Tensor, precedence: Tensor, write_w: Tensor, read_w: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """link_update, then temporal_reads through the new links (one DNC step's link work).

    link [B, N, N], precedence [B, N], write_w [B, N], read_w [B, R, N]
    -> (link [B, N, N], precedence [B, N], forward [B, R, N], backward [B, R, N]).
    """
    new_link, new_precedence = link_update_ref(link, precedence, write_w)
    forward, backward = temporal_reads_ref(new_link, read_w)
    return new_link, new_precedence, forward, backward


def dnc_write_ref(
    memory: Tensor,
    usage: Tensor,
    write_w: Tensor,
    read_w: Tensor,
    free_gates: Tensor,
    write_key: Tensor,
    write_strength: Tensor,
    allocation_gate: Tensor,
    write_gate: Tensor,
    erase: Tensor,
    add: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One DNC step's write half: usage, allocation, write weights, write.

    u_t = usage_update(u, w^w_{t-1}, w^r_{t-1}, f); a = allocation(u_t); c^w = C(M, k^w, b^w);
    w^w_t = g_w (g_a a + (1 - g_a) c^w); M_t = M (1 - w^w_t e^T) + w^w_t v^T.
    memory [B, N, W], usage [B, N], write_w [B, N] and read_w [B, R, N] (the previous step's),
    free_gates [B, R], write_key [B, 1, W], write_strength [B, 1], allocation_gate [B, 1],
    write_gate [B, 1], erase [B, W], add [B, W]
    -> (memory [B, N, W], usage [B, N], write_w [B, N], allocation [B, N], write_content [B, 1, N]).
    """
    usage = usage_update_ref(usage, write_w, read_w, free_gates)
    allocation = allocation_weights_ref(usage)
    write_content = content_weights_ref(memory, write_key, write_strength)
    write_w = write_gate * (allocation_gate * allocation + (1 - allocation_gate) * write_content[:, 0])
    return memory_write_ref(memory, write_w, erase, add), usage, write_w, allocation, write_content


def dnc_read_ref(
    memory: Tensor, read_keys: Tensor, read_strengths: Tensor, read_modes: Tensor, backward: Tensor, forward: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """One DNC step's read half: content weights, the read modes' mix with the temporal weights, read.

    c^r = C(M, k^r, b^r); w^r = pi_1 b + pi_2 c^r + pi_3 f; r = M^T w^r.
    memory [B, N, W] (after the write), read_keys [B, R, W], read_strengths [B, R],
    read_modes [B, R, 3] (backward, content, forward), backward and forward [B, R, N]
    -> (reads [B, R, W], read_w [B, R, N], read_content [B, R, N]).
    """
    read_content = content_weights_ref(memory, read_keys, read_strengths)
    modes = read_modes.unsqueeze(-1)
    read_w = modes[:, :, 0] * backward + modes[:, :, 1] * read_content + modes[:, :, 2] * forward
    return memory_read_ref(memory, read_w), read_w, read_content


def split_interface_ref(interface: Tensor, R: int, W: int) -> tuple[Tensor, ...]:
    """One step's interface vector xi_t [B, R*W + 3W + 5R + 3], split and squashed as in the DNC paper.

    -> (read_keys [B, R, W], read_strengths [B, R] = oneplus, write_key [B, 1, W], write_strength
    [B, 1] = oneplus, erase [B, W] = sigmoid, write_vector [B, W], free_gates [B, R] = sigmoid,
    allocation_gate [B, 1] = sigmoid, write_gate [B, 1] = sigmoid, read_modes [B, R, 3] = softmax
    over (backward, content, forward)); oneplus(x) = 1 + softplus(x).
    """
    B = interface.shape[0]
    parts = interface.split([R * W, R, W, 1, W, W, R, 1, 1, 3 * R], dim=-1)
    read_keys, read_strengths, write_key, write_strength, erase, write_vector = parts[:6]
    free_gates, allocation_gate, write_gate, read_modes = parts[6:]
    return (
        read_keys.view(B, R, W),
        1 + F.softplus(read_strengths),
        write_key.view(B, 1, W),
        1 + F.softplus(write_strength),
        torch.sigmoid(erase),
        write_vector,
        torch.sigmoid(free_gates),
        torch.sigmoid(allocation_gate),
        torch.sigmoid(write_gate),
        torch.softmax(read_modes.view(B, R, 3), dim=-1),
    )


def lstm_cell_ref(
    gates_x: Tensor, reads: Tensor, hidden: Tensor, cell: Tensor, weight_rh: Tensor
) -> tuple[Tensor, Tensor]:
    """One step of the sequence ops' LSTM-cell controller: gates = gates_x + [r_{t-1} ; h_{t-1}]
    weight_rh^T (gates_x holds the input's part and both biases); i, f, g, o = sigmoid, sigmoid, tanh,
    sigmoid of its four quarters; c_t = f c_{t-1} + i g; h_t = o tanh(c_t).

    gates_x [B, 4H], reads [B, R, W], hidden and cell [B, H], weight_rh [4H, R*W + H] -> (h_t, c_t).
    """
    gates = gates_x + torch.cat([reads.flatten(1), hidden], dim=-1) @ weight_rh.T
    i, f, g, o = gates.chunk(4, dim=-1)
    new_cell = torch.sigmoid(f) * cell + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(new_cell), new_cell


def rows_where(active: Tensor, new: Tensor, old: Tensor) -> Tensor:
    """new in the batch rows where active [B] is True, old elsewhere."""
    return torch.where(active.view(-1, *[1] * (new.dim() - 1)), new, old)


def dnc_sequence_ref(
    gates_x: Tensor,
    hidden: Tensor,
    cell: Tensor,
    reads: Tensor,
    memory: Tensor,
    usage: Tensor,
    link: Tensor,
    precedence: Tensor,
    read_w: Tensor,
    write_w: Tensor,
    weight_rh: Tensor,
    weight_if: Tensor,
    bias_if: Tensor,
    active: Tensor,
    checkpoint_every: int = 1,
) -> tuple[Tensor, ...]:
    """T steps of a DNC whose controller is an LSTM cell: what sparsemem.models.DNC runs each step.

    Per step t: h_t, c_t = lstm_cell_ref(gates_x[t], r_{t-1}, h_{t-1}, c_{t-1}); xi_t = h_t weight_if^T +
    bias_if, split (split_interface_ref); then dnc_write, link_update_reads and dnc_read. A row whose
    active[t] is False (padding) keeps its state (hidden, cell, reads and the memory's), and writes
    nothing to the links (link_update_reads with its write weights 0), as DNCMemory.step does.
    gates_x [T, B, 4H], hidden and cell [B, H], reads [B, R, W] (the last step's), memory [B, N, W],
    usage [B, N], link [B, N, N], precedence [B, N], read_w [B, R, N], write_w [B, N] (the memory's
    state), weight_rh [4H, R*W + H], weight_if [I, H], bias_if [I] (I = R*W + 3W + 5R + 3), active
    [T, B] bool
    -> (hidden [T, B, H], reads [T, B, R, W] (every step's), cell [B, H], memory, usage, link,
    precedence, read_w, write_w (the memory's state after step T)).
    checkpoint_every: how the fused kernel keeps the links for its backward; no value depends on it.
    """
    R, W = reads.shape[1], reads.shape[2]
    hiddens, every_reads = [], []
    for gates_t, active_t in zip(gates_x.unbind(0), active.unbind(0), strict=True):
        kept = functools.partial(rows_where, active_t)
        new_hidden, new_cell = lstm_cell_ref(gates_t, reads, hidden, cell, weight_rh)
        interface = split_interface_ref(new_hidden @ weight_if.T + bias_if, R, W)
        read_keys, read_strengths, write_key, write_strength, erase, write_vector = interface[:6]
        free_gates, allocation_gate, write_gate, read_modes = interface[6:]
        new_memory, new_usage, new_write_w, _, _ = dnc_write_ref(
            memory,
            usage,
            write_w,
            read_w,
            free_gates,
            write_key,
            write_strength,
            allocation_gate,
            write_gate,
            erase,
            write_vector,
        )
        link_writes = kept(new_write_w, torch.zeros_like(new_write_w))
        link, precedence, forward, backward = link_update_reads_ref(link, precedence, link_writes, read_w)
        new_reads, new_read_w, _ = dnc_read_ref(new_memory, read_keys, read_strengths, read_modes, backward, forward)
        hidden, cell, reads = kept(new_hidden, hidden), kept(new_cell, cell), kept(new_reads, reads)
        memory, usage = kept(new_memory, memory), kept(new_usage, usage)
        write_w, read_w = kept(new_write_w, write_w), kept(new_read_w, read_w)
        hiddens.append(hidden)
        every_reads.append(reads)
    return torch.stack(hiddens), torch.stack(every_reads), cell, memory, usage, link, precedence, read_w, write_w
