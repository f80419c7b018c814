"""Valid inputs for every registered op, at any size and dtype, for tests and benchmarks.

op_inputs(op, dtype, B, N, W, R) -> positional arguments of sparsemem.ops.<op> (for the internal
journaled_write, dnc_sequence and sam_sequence, of sparsemem.ops.<op>.<op>). The tables of ops below come
from the backend registry.
Values are in the ranges the ops expect (weights are distributions, gates in [0, 1],
sharpening >= 1) and usages are distinct so sorts have no ties.
"""

import torch

import sparsemem.ops  # noqa: F401  (declares every op in the registry)
from sparsemem import _backends
from sparsemem.reference import sdnc_link_update_ref

K = 4
S = 3
LINK_K = 3


def _distribution(*shape, generator, dtype):
    return torch.softmax(torch.randn(*shape, generator=generator, dtype=dtype) * 2, dim=-1)


def op_inputs(op: str, dtype: torch.dtype = torch.float64, B=3, N=7, W=5, R=3, seed=0) -> tuple:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    def rand(*shape):
        return torch.rand(*shape, generator=g, dtype=dtype)

    def distribution(*shape):
        return _distribution(*shape, generator=g, dtype=dtype)

    # The sequence ops' (dnc_sequence, sam_sequence) LSTM cell of H = 5 over T = 4 steps: gates_x, hidden,
    # cell and the last reads; its recurrent and interface weights (I interface values); and which
    # rows run each step: row b runs T - (b mod T) steps, then is padding (4, 3, 2, 1, 4, ...).
    T, H = 4, 5

    def cell_state():
        return randn(T, B, 4 * H), randn(B, H) * 0.5, randn(B, H) * 0.5, randn(B, R, W) * 0.5

    def cell_weights(I):
        return randn(4 * H, R * W + H) * 0.5, randn(I, H) * 0.5, randn(I) * 0.5

    active = torch.arange(T).unsqueeze(1) < torch.tensor([T - b % T for b in range(B)])
    memory = randn(B, N, W)
    if op in ("content_weights", "content_read"):
        return memory, randn(B, R, W), rand(B, R) * 5
    if op == "usage_update":
        return rand(B, N), distribution(B, N) * 0.9, distribution(B, R, N), rand(B, R)
    if op == "allocation_weights":
        # distinct usages (a random permutation of a grid) so the sort has no ties
        grid = (torch.arange(N, dtype=dtype) + 0.5) / N
        return (torch.stack([grid[torch.randperm(N, generator=g)] for _ in range(B)]),)
    if op == "memory_write":
        return memory, distribution(B, N), rand(B, W), randn(B, W)
    if op == "dnc_write":
        usage, write_w, read_w, free_gates = op_inputs("usage_update", dtype, B, N, W, R, seed + 1)
        gates = rand(B, 2)
        return (
            memory,
            usage,
            write_w,
            read_w,
            free_gates,
            randn(B, 1, W),
            1 + rand(B, 1) * 4,
            gates[:, :1],
            gates[:, 1:],
            rand(B, W),
            randn(B, W),
        )
    if op == "dnc_read":
        return (
            memory,
            randn(B, R, W),
            1 + rand(B, R) * 4,
            torch.softmax(randn(B, R, 3), -1),
            distribution(B, R, N) * 0.5,
            distribution(B, R, N) * 0.5,
        )
    if op == "memory_read":
        return memory, distribution(B, R, N)
    if op == "link_update":
        link = rand(B, N, N) / N * (1 - torch.eye(N, dtype=dtype))
        return link, distribution(B, N) * 0.5, distribution(B, N) * 0.9
    if op == "link_update_reads":
        link = rand(B, N, N) / N * (1 - torch.eye(N, dtype=dtype))
        return link, distribution(B, N) * 0.5, distribution(B, N) * 0.9, distribution(B, R, N)
    if op == "temporal_reads":
        return rand(B, N, N) / N, distribution(B, R, N)
    if op == "ntm_address":
        return (
            memory,
            randn(B, R, W),
            rand(B, R) * 5,
            rand(B, R) * 0.8 + 0.1,
            distribution(B, R, S),
            1 + rand(B, R) * 2,
            distribution(B, R, N),
        )
    if op == "topk_content":
        return memory, randn(B, R, W), min(K, N)
    if op == "sparse_read":
        indices = torch.stack([torch.randperm(N, generator=g)[: min(K, N)] for _ in range(B * R)]).reshape(B, R, -1)
        return memory, indices, randn(B, R, W), rand(B, R) * 5
    if op == "sparse_write":
        J = min(2 * K + 1, N)
        erase = torch.zeros(B, J, dtype=torch.bool)
        erase[:, -1] = True
        return randn(B, J, W), distribution(B, J), randn(B, W), erase
    if op in ("sparse_link_update", "sparse_temporal_reads"):
        return _sparse_link_inputs(op, B, N, R, g, rand, distribution)
    if op == "dnc_sequence":
        # from a memory mid-episode (links off the diagonal, weights that are distributions), some rows
        # padded after a few steps; the backward keeps the links before steps 0 and 2 and rebuilds
        # the others (checkpoint_every = 2)
        usage, write_w, read_w, _ = op_inputs("usage_update", dtype, B, N, W, R, seed + 1)
        link, precedence, _ = op_inputs("link_update", dtype, B, N, W, R, seed + 2)
        controller = cell_state()
        memory_state = (memory, usage, link, precedence, read_w, write_w)
        return *controller, *memory_state, *cell_weights(R * W + 3 * W + 5 * R + 3), active, 2
    if op == "sam_sequence":
        # from a memory mid-episode: about half its slots written (the others hold the zero word),
        # distinct last-access steps, read weights that are distributions over K slots per head; some
        # rows padded after a few steps
        k = min(K, N)
        written = torch.rand(B, N, generator=g) < 0.5
        last_access = (torch.stack([torch.randperm(N, generator=g) for _ in range(B)]) + 1) * written
        read_idx = torch.stack([torch.randperm(N, generator=g)[:k] for _ in range(B * R)]).view(B, R, k)
        write_idx = torch.cat([read_idx.flatten(1), torch.randint(0, N, (B, 1), generator=g)], dim=-1)
        controller = cell_state()
        read_w = distribution(B, R, k)
        memory_state = (memory * written.unsqueeze(-1), last_access, written, read_idx, read_w, write_idx)
        memory_state += (rand(B, R * k + 1) * 0.3,)
        return *controller, *memory_state, *cell_weights(R * W + R + W + 2), active, N + 1
    if op == "sdnc_sequence":
        # sam_sequence's memory mid-episode with 3K read places per head (backward, content, forward
        # thirds), a link matrix cut like SDNC's, stored both ways (rows of L, then rows of L^T), and
        # a precedence with an empty place
        k, link_k = min(K, N), min(LINK_K, N)
        written = torch.rand(B, N, generator=g) < 0.5
        last_access = (torch.stack([torch.randperm(N, generator=g) for _ in range(B)]) + 1) * written
        read_idx = torch.stack([torch.randperm(N, generator=g)[:k] for _ in range(3 * B * R)]).view(B, R, 3 * k)
        write_idx = torch.cat([read_idx.flatten(1), torch.randint(0, N, (B, 1), generator=g)], dim=-1)
        link = rand(B, N, N) * (rand(B, N, N) < 0.5) / N
        link, _ = sdnc_link_update_ref(link, link.new_zeros(B, N), link.new_zeros(B, N), link_k)
        slots = torch.arange(N).expand(B, N)
        (forward_idx, forward_w), (backward_idx, backward_w) = (
            link_rows(matrix, slots, link_k) for matrix in (link, link.transpose(1, 2))
        )
        precedence = torch.stack([torch.randperm(N, generator=g)[:link_k] for _ in range(B)])
        precedence[:, -1] = -1
        controller = cell_state()
        memory_state = (memory * written.unsqueeze(-1), last_access, written, read_idx, distribution(B, R, 3 * k))
        memory_state += (write_idx, rand(B, 3 * R * k + 1) * 0.3)
        links = (torch.cat([forward_idx, backward_idx], 1), torch.cat([forward_w, backward_w], 1), precedence)
        links += (distribution(B, link_k) * 0.5 * (precedence >= 0),)
        return *controller, *memory_state, *links, *cell_weights(R * W + R + W + 2 + 3 * R), active, N + 1
    if op == "journaled_write":
        # sparse_write's arguments in place on a store of B*N flat rows, half of them written;
        # keys b*N + slot, distinct per batch row
        rows, weights, add, erase_rows = op_inputs("sparse_write", dtype, B, N, W, R, seed)
        J = rows.shape[1]
        slots = torch.stack([torch.randperm(N, generator=g)[:J] for _ in range(B)])
        written = torch.rand(B * N, generator=g) < 0.5
        return randn(B * N, W), written, randn(W), slots + N * torch.arange(B)[:, None], weights, add, erase_rows
    raise KeyError(op)


def link_rows(link: torch.Tensor, slots: torch.Tensor, link_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of link [B, N, N] at slots [B, ...] (-1: an empty row) as K_L (index, value) pairs."""
    values, indices = torch.topk(link, link_k, dim=-1)
    indices = indices.masked_fill(values == 0, -1)
    flat = slots.clamp(min=0).reshape(slots.shape[0], -1, 1).expand(-1, -1, link_k)
    empty = (slots < 0).unsqueeze(-1)
    rows = indices.gather(1, flat).view(*slots.shape, link_k).masked_fill(empty, -1)
    return rows, values.gather(1, flat).view(*slots.shape, link_k).masked_fill(empty, 0)


def _sparse_link_inputs(op, B, N, R, g, rand, distribution) -> tuple:
    """A random link matrix cut like SDNC's (K_L per row and column), stored both ways."""
    link_k = min(LINK_K, N)
    link = rand(B, N, N) * (rand(B, N, N) < 0.5) / N
    link, _ = sdnc_link_update_ref(link, link.new_zeros(B, N), link.new_zeros(B, N), link_k)
    if op == "sparse_temporal_reads":
        reads = min(2 * K + 1, N)
        slots = torch.randint(0, N, (B, R, reads), generator=g)  # repeats allowed: their rows add up
        return (distribution(B, R, reads), *link_rows(link, slots, link_k),
                *link_rows(link.transpose(1, 2), slots, link_k), min(K, N))  # fmt: skip

    def gathered(matrix):
        # every slot, shuffled, with two padding rows among them: a superset of the rows that change
        slots = torch.stack([torch.randperm(N, generator=g) for _ in range(B)])
        slots = torch.cat([slots, slots.new_full((B, 2), -1)], dim=-1)
        slots = slots.gather(-1, torch.stack([torch.randperm(N + 2, generator=g) for _ in range(B)]))
        return (slots, *link_rows(matrix, slots, link_k))

    precedence = torch.stack([torch.randperm(N, generator=g)[:link_k] for _ in range(B)])
    precedence[:, -1] = -1
    writes = torch.randint(0, N, (B, min(2 * K + 1, N)), generator=g)
    writes[:, 0] = -1
    precedence_values = distribution(B, link_k) * 0.5 * (precedence >= 0)
    write_weights = distribution(B, writes.shape[1]) * 0.9
    return (*gathered(link), *gathered(link.transpose(1, 2)), precedence, precedence_values, writes, write_weights)


def _kernel_ops(every_input_differentiable: bool) -> tuple[str, ...]:
    def dense(info) -> bool:
        return len(info.differentiable) == len(info.inputs)

    return tuple(
        op
        for op in OPS
        if "cpp" in _backends.op_info(op).backends and dense(_backends.op_info(op)) == every_input_differentiable
    )


OPS = _backends.ops(public=True)
"""Every public op (sparsemem.ops), in the registry's order."""

DENSE_KERNEL_OPS = _kernel_ops(every_input_differentiable=True)
"""The dense ops with C++, CUDA and Triton kernels; every input of each is differentiable."""

SPARSE_KERNEL_OPS = _kernel_ops(every_input_differentiable=False)
"""The sparse ops with C++, CUDA and Triton kernels; their index inputs take no gradient."""

QUADRATIC_OPS = tuple(op for op in OPS if _backends.op_info(op).stem == "links")
"""Ops on [B, N, N] link matrices (the links family): N = 4097 is 50M elements per tensor in float64."""
