"""Inputs the kernel tests share."""

import torch


def hard_usages(B: int, N: int, dtype: torch.dtype) -> torch.Tensor:
    """Usages with exact 0s, exact 1s and ties, in a different order per row."""
    g = torch.Generator().manual_seed(N)
    levels = torch.tensor([0.0, 1.0, 0.5, 0.25, 0.9], dtype=dtype)
    usage = torch.rand(B, N, generator=g, dtype=dtype)
    hard = torch.rand(B, N, generator=g) < 0.5
    return torch.where(hard, levels[torch.randint(len(levels), (B, N), generator=g)], usage)
