"""Content addressing: cosine similarity of R keys against N slots, strength, softmax over N."""

import torch
from torch import Tensor

from sparsemem._checks import Shapes, check_finite
from sparsemem.ops._define import define_op
from sparsemem.reference import content_read_ref, content_weights_ref


def _check(memory: Tensor, keys: Tensor, strengths: Tensor) -> None:
    Shapes().check("memory", memory, "B N W").check("keys", keys, "B R W").check("strengths", strengths, "B R")
    check_finite("memory", memory, state=True)
    check_finite("keys", keys)
    check_finite("strengths", strengths)


_content_weights = define_op(
    "content_weights",
    "(Tensor memory, Tensor keys, Tensor strengths) -> Tensor",
    content_weights_ref,
    lambda memory, keys, strengths: keys.new_empty(keys.shape[0], keys.shape[1], memory.shape[1]),
    differentiable=(0, 1, 2),
    stem="content",
)


def content_weights(memory: Tensor, keys: Tensor, strengths: Tensor) -> Tensor:
    """softmax_i(b_r * cos(k_r, M_i)): memory [B, N, W], keys [B, R, W], strengths [B, R] -> [B, R, N]."""
    _check(memory, keys, strengths)
    return _content_weights(memory, keys, strengths)


def _content_read_fake(memory: Tensor, keys: Tensor, strengths: Tensor) -> tuple[Tensor, Tensor]:
    return keys.new_empty(keys.shape[0], keys.shape[1], memory.shape[1]), torch.empty_like(keys)


_content_read = define_op(
    "content_read",
    "(Tensor memory, Tensor keys, Tensor strengths) -> (Tensor, Tensor)",
    content_read_ref,
    _content_read_fake,
    differentiable=(0, 1, 2),
    stem="content",
)


def content_read(memory: Tensor, keys: Tensor, strengths: Tensor) -> tuple[Tensor, Tensor]:
    """Content weights and their read vectors in one pass: -> (weights [B, R, N], reads [B, R, W])."""
    _check(memory, keys, strengths)
    return _content_read(memory, keys, strengths)
