"""Realistic memories and queries for measuring an index's recall (tests and bench/bench_index.py).

A trained memory is not random noise: words cluster around the few things a model writes,
and a read key lands near a stored word. Recall on uniform random words, where every
neighbour is almost equally far, says little about either (DESIGN.md, "Lazy memory").
"""

import torch
from torch import Tensor

from sparsemem.index.base import Index


def clustered_words(
    batch_size: int, rows: int, word_size: int, *, clusters: int = 256, spread: float = 0.5, seed: int = 0
) -> Tensor:
    """[B, rows, W] words: a random centre per cluster (N(0, 1)) plus N(0, spread^2) noise per word."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(batch_size, clusters, word_size, generator=g)
    members = torch.randint(0, clusters, (batch_size, rows), generator=g)
    words = centres.gather(1, members.unsqueeze(-1).expand(-1, -1, word_size))
    return words + spread * torch.randn(batch_size, rows, word_size, generator=g)


def near_queries(words: Tensor, heads: int, *, noise: float = 0.3, seed: int = 1) -> Tensor:
    """[B, R, W] keys: a random stored word of each batch row plus N(0, noise^2) noise."""
    g = torch.Generator().manual_seed(seed)
    batch_size, rows, word_size = words.shape
    picks = torch.randint(0, rows, (batch_size, heads), generator=g)
    chosen = words.gather(1, picks.unsqueeze(-1).expand(-1, -1, word_size))
    return chosen + noise * torch.randn(batch_size, heads, word_size, generator=g)


def recall(index: Index, exact: Index, queries: Tensor, k: int) -> float:
    """Mean over queries of |top-K of index ∩ top-K of exact| / K."""
    _, found = index.search(queries, k)
    _, truth = exact.search(queries, k)
    hits = (found.unsqueeze(-1) == truth.unsqueeze(-2)).any(-1).sum()
    return hits.item() / truth.numel()
