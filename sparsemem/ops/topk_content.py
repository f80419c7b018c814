"""SAM's content search: the K most similar slots per key, fused score + top-K (reference/sparse.py:
topk_content_ref)."""

import torch
from torch import Tensor

from sparsemem._checks import Shapes, check_finite, check_k
from sparsemem.ops._define import define_op
from sparsemem.reference import topk_content_ref


def _topk_content_fake(memory: Tensor, keys: Tensor, k: int) -> tuple[Tensor, Tensor]:
    shape = (keys.shape[0], keys.shape[1], k)
    return keys.new_empty(shape), keys.new_empty(shape, dtype=torch.int64)


_topk_content = define_op(
    "topk_content",
    "(Tensor memory, Tensor keys, SymInt k) -> (Tensor, Tensor)",
    topk_content_ref,
    _topk_content_fake,
    differentiable=(0, 1),
    stem="topk_content",
)


def topk_content(memory: Tensor, keys: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The K most similar slots per key: memory [B, N, W], keys [B, R, W] -> (scores [B, R, K], indices [B, R, K]).

    Scores are cosine similarities, sorted descending; indices are int64 slot ids. Equal scores:
    the lower slot first, on every backend. The memory gradient is dense [B, N, W], non-zero on the
    K rows per head only.
    """
    shapes = Shapes().check("memory", memory, "B N W").check("keys", keys, "B R W")
    check_k(k, shapes.size("N"))
    check_finite("memory", memory, state=True)
    check_finite("keys", keys)
    return _topk_content(memory, keys, k)
