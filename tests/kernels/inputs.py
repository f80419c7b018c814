"""Inputs the kernel tests share."""

import torch

from sparsemem.reference import sdnc_link_update_ref
from sparsemem.testing import link_rows


def hard_usages(B: int, N: int, dtype: torch.dtype) -> torch.Tensor:
    """Usages with exact 0s, exact 1s and ties, in a different order per row."""
    g = torch.Generator().manual_seed(N)
    levels = torch.tensor([0.0, 1.0, 0.5, 0.25, 0.9], dtype=dtype)
    usage = torch.rand(B, N, generator=g, dtype=dtype)
    hard = torch.rand(B, N, generator=g) < 0.5
    return torch.where(hard, levels[torch.randint(len(levels), (B, N), generator=g)], usage)


def link_matrix(B: int, N: int, link_k: int, g: torch.Generator, ties: bool) -> torch.Tensor:
    """A link matrix cut like SDNC's (K_L per row and column); with ties, values on a grid of 1/8."""
    present = torch.rand(B, N, N, generator=g, dtype=torch.float64) < 0.5
    if ties:
        link = torch.randint(1, 4, (B, N, N), generator=g).double() / 8 * present
    else:
        link = torch.rand(B, N, N, generator=g, dtype=torch.float64) * present / N
    link[:, 1] = 0  # a slot with an empty forward row
    link[:, :, 2] = 0  # and one with an empty backward row
    link, _ = sdnc_link_update_ref(link, link.new_zeros(B, N), link.new_zeros(B, N), link_k)
    return link


def link_update_inputs(B, N, link_k, J, dtype, seed=0, ties=False, part=False) -> tuple:
    """The arguments of sparse_link_update: every slot's row (or, with part, about half of them),
    shuffled, with two padding rows; precedence with an empty place; writes with an empty place
    and a slot written twice."""
    g = torch.Generator().manual_seed(seed)
    link = link_matrix(B, N, link_k, g, ties)

    def gathered(matrix):
        slots = torch.stack([torch.randperm(N, generator=g) for _ in range(B)])
        if part:
            slots = slots[:, : (N + 1) // 2]
        slots = torch.cat([slots, slots.new_full((B, 2), -1)], dim=-1)
        slots = slots.gather(-1, torch.stack([torch.randperm(slots.shape[1], generator=g) for _ in range(B)]))
        return (slots, *link_rows(matrix, slots, link_k))

    precedence = torch.stack([torch.randperm(N, generator=g)[:link_k] for _ in range(B)])
    precedence[:, -1] = -1
    writes = torch.randint(0, N, (B, J), generator=g)
    writes[:, 0] = -1
    writes[:, 2] = writes[:, 1]
    if ties:
        precedence_values = torch.randint(1, 5, (B, link_k), generator=g).double() / 16
        write_weights = torch.randint(0, 3, (B, J), generator=g).double() / 32
    else:
        precedence_values = torch.rand(B, link_k, generator=g, dtype=torch.float64) * 0.5
        write_weights = torch.softmax(torch.randn(B, J, generator=g, dtype=torch.float64) * 2, -1) * 0.9
    precedence_values = precedence_values * (precedence >= 0)
    args = (*gathered(link), *gathered(link.transpose(1, 2)), precedence, precedence_values, writes, write_weights)
    return tuple(a.to(dtype) if a.is_floating_point() else a for a in args)


def temporal_reads_inputs(B, N, R, Q, link_k, dtype, seed=0, ties=False) -> tuple:
    """read_weights [B, R, Q] on random slots (repeats, and one empty read slot), the link rows there."""
    g = torch.Generator().manual_seed(seed)
    link = link_matrix(B, N, link_k, g, ties)
    slots = torch.randint(0, N, (B, R, Q), generator=g)
    slots[:, :, 0] = -1
    if ties:
        read_weights = torch.randint(1, 4, (B, R, Q), generator=g).double() / 8
    else:
        read_weights = torch.softmax(torch.randn(B, R, Q, generator=g, dtype=torch.float64) * 2, -1)
    args = (read_weights, *link_rows(link, slots, link_k), *link_rows(link.transpose(1, 2), slots, link_k))
    return tuple(a.to(dtype) if a.is_floating_point() else a for a in args)
