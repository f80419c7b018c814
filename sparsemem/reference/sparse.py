"""Sparse access (SAM, Rae et al. 2016): the specification of the sparse ops.

With K = N and indices = arange(N), sparse_read_ref equals content_read_ref.
"""

import torch
from torch import Tensor

from sparsemem.reference.dnc import cosine_similarity_ref, safe_norm


def gather_rows(memory: Tensor, indices: Tensor) -> Tensor:
    """memory [B, N, W], indices [B, R, K] -> rows [B, R, K, W]."""
    batch, heads, k = indices.shape
    flat = indices.reshape(batch, heads * k, 1).expand(-1, -1, memory.shape[-1])
    return memory.gather(1, flat).reshape(batch, heads, k, memory.shape[-1])


def topk_content_ref(memory: Tensor, keys: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The K slots most similar (cosine) to each key: (scores [B, R, K], indices [B, R, K]).

    Scores are D(k_r, M_i), sorted descending, equal scores the lower slot first (as every kernel:
    torch.topk leaves their order unspecified); they are differentiable in memory and keys.
    """
    scores, indices = torch.sort(cosine_similarity_ref(memory, keys), dim=-1, descending=True, stable=True)
    return scores[..., :k].contiguous(), indices[..., :k].contiguous()


def sparse_read_ref(memory: Tensor, indices: Tensor, keys: Tensor, strengths: Tensor) -> tuple[Tensor, Tensor]:
    """Content read restricted to K candidate slots per head.

    w[k] = softmax_k(b * D(key, M[idx_k])), r = sum_k w[k] M[idx_k].
    memory [B, N, W], indices [B, R, K], keys [B, R, W], strengths [B, R]
    -> (weights [B, R, K], reads [B, R, W]).
    """
    rows = gather_rows(memory, indices)
    dots = (rows * keys.unsqueeze(2)).sum(-1)
    similarity = dots / (safe_norm(keys).unsqueeze(-1) * safe_norm(rows))
    weights = torch.softmax(strengths.unsqueeze(-1) * similarity, dim=-1)
    reads = (weights.unsqueeze(-1) * rows).sum(2)
    return weights, reads


def sparse_write_ref(rows: Tensor, weights: Tensor, add: Tensor, erase_rows: Tensor) -> Tensor:
    """SAM write on gathered rows: new = rows * (1 - erase) + w add^T.

    rows [B, J, W], weights [B, J], add [B, W], erase_rows [B, J] bool (a row
    erased wholly, SAM's least recently used row) -> new rows [B, J, W].
    """
    keep = (~erase_rows).to(rows.dtype).unsqueeze(-1)
    return rows * keep + weights.unsqueeze(-1) * add.unsqueeze(1)


def journaled_write_ref(
    rows: Tensor, written: Tensor, initial_word: Tensor, keys: Tensor, weights: Tensor, add: Tensor, erase_rows: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """sparse_write_ref done in place on a row store, keeping what it overwrote.

    rows [M, W] (written in place), written [M] bool (set at every key), initial_word [W] (what an
    unwritten row reads as), keys [B, J] int64, weights [B, J], add [B, W], erase_rows [B, J] bool
    -> (old rows [B, J, W], new rows [B, J, W], fresh [B, J] bool: the first entry of each key that
    was unwritten). A key repeated in keys must carry identical weights and erase_rows, so that
    its entries store the same row.
    """
    flat = keys.reshape(-1)
    was_written = written[flat].view(keys.shape)
    old = torch.where(was_written.unsqueeze(-1), rows[flat].view(*keys.shape, -1), initial_word)
    new = sparse_write_ref(old, weights, add, erase_rows)
    rows[flat] = new.view(-1, rows.shape[-1])
    written[flat] = True
    repeat = (keys.unsqueeze(-1) == keys.unsqueeze(-2)).tril(-1).any(-1)  # an earlier entry has the key
    return old, new, ~was_written & ~repeat
