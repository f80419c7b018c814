"""sparse_read: softmax over K gathered rows and the read (sparsemem.ops.sparse_read).

One program per head gathers its K rows, scores them, takes the softmax over the K and the read,
all in registers. The backward writes the gradient of each gathered row, [B, R, K, W], and one
scatter-add (fixed order, no atomics) makes the dense memory gradient, as topk_content's does.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    EPS,
    accumulator_dtype,
    contiguous,
    gather_head,
    gathered_cosine_backward,
    norms,
    pow2,
    scatter_rows,
    tile_at,
)


@triton.jit
def sparse_read_kernel(
    memory_ptr,
    indices_ptr,
    keys_ptr,
    strengths_ptr,
    weights_ptr,
    reads_ptr,
    N,
    R,
    W,
    K,
    EPS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    # One program per head (b, r): its K rows [BLOCK_K, BLOCK_W] gathered into registers once;
    # w = softmax_k(b D(key, x_k)) and r = sum_k w_k x_k from them.
    head = tl.program_id(0)
    acc = tl.float64 if memory_ptr.dtype.element_ty == tl.float64 else tl.float32
    j = tl.arange(0, BLOCK_K)
    w = tl.arange(0, BLOCK_W)
    j_ok = j < K
    w_ok = w < W
    rows, key, key_norm = gather_head(memory_ptr, indices_ptr, keys_ptr, head, N, R, W, K, acc, EPS, BLOCK_K, BLOCK_W)
    strength = tl.load(strengths_ptr + head).to(acc)
    word_norm = norms(rows, EPS)
    logits = strength * tl.sum(rows * key[None, :], 1) / (key_norm * word_norm)
    logits = tl.where(j_ok, logits, float("-inf"))
    p = tl.exp(logits - tl.max(logits))
    weights = p / tl.sum(p)
    tl.store(weights_ptr + head * K + j, weights, mask=j_ok)
    tl.store(reads_ptr + head * W + w, tl.sum(weights[:, None] * rows, 0), mask=w_ok)


def sparse_read_forward(memory: Tensor, indices: Tensor, keys: Tensor, strengths: Tensor) -> tuple[Tensor, Tensor]:
    memory, indices, keys, strengths = contiguous(memory, indices, keys, strengths)
    B, N, W = memory.shape
    R, K = indices.shape[1], indices.shape[2]
    if N == 0 and indices.numel() > 0:  # every index would be out of range (the kernel does not check)
        raise ValueError("indices must be slot ids in [0, N=0)")
    weights = torch.empty(B, R, K, dtype=memory.dtype, device=memory.device)
    reads = torch.empty(B, R, W, dtype=memory.dtype, device=memory.device)
    sparse_read_kernel[(B * R,)](
        memory, indices, keys, strengths, weights, reads, N, R, W, K,
        EPS=EPS, BLOCK_K=pow2(K), BLOCK_W=pow2(W),
    )  # fmt: skip
    return weights, reads


@triton.jit
def sparse_read_backward_kernel(
    memory_ptr,
    indices_ptr,
    keys_ptr,
    strengths_ptr,
    weights_ptr,
    grad_weights_ptr,
    grad_reads_ptr,
    grad_rows_ptr,
    grad_keys_ptr,
    grad_strengths_ptr,
    N,
    R,
    W,
    K,
    EPS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    # One program per head, rows gathered again. With u_k = gw_k + gr . x_k (all that reaches w_k):
    #   gz_k = w_k (u_k - sum_j w_j u_j),  grad b = sum_k gz_k s_k,  gs_k = b gz_k,
    #   grad x_k = w_k gr + (cosine terms of gs),  grad key = cosine terms of gs.
    head = tl.program_id(0)
    acc = grad_rows_ptr.dtype.element_ty
    j = tl.arange(0, BLOCK_K)
    w = tl.arange(0, BLOCK_W)
    j_ok = j < K
    w_ok = w < W
    rows, key, key_norm = gather_head(memory_ptr, indices_ptr, keys_ptr, head, N, R, W, K, acc, EPS, BLOCK_K, BLOCK_W)
    strength = tl.load(strengths_ptr + head).to(acc)
    weights = tl.load(weights_ptr + head * K + j, mask=j_ok, other=0.0).to(acc)
    grad_read = tl.load(grad_reads_ptr + head * W + w, mask=w_ok, other=0.0).to(acc)
    upstream = tl.load(grad_weights_ptr + head * K + j, mask=j_ok, other=0.0).to(acc)
    upstream += tl.sum(rows * grad_read[None, :], 1)
    grad_logits = weights * (upstream - tl.sum(weights * upstream))
    similarity = tl.sum(rows * key[None, :], 1) / (key_norm * norms(rows, EPS))
    tl.store(grad_strengths_ptr + head, tl.sum(grad_logits * similarity))
    grad_rows, grad_key = gathered_cosine_backward(rows, key, key_norm, strength * grad_logits, EPS)
    grad_rows += weights[:, None] * grad_read[None, :]
    at, mask = tile_at(head, j, K, w, W)  # [B, R, K, W]
    tl.store(grad_rows_ptr + at, grad_rows, mask=mask)
    tl.store(grad_keys_ptr + head * W + w, grad_key, mask=w_ok)


def sparse_read_backward(grads: list[Tensor], inputs: list[Tensor], outputs: list[Tensor]) -> list[Tensor]:
    """grads [grad_weights, grad_reads] -> [grad_memory, grad_keys, grad_strengths]."""
    memory, indices, keys, strengths = contiguous(*inputs)
    grad_weights, grad_reads = contiguous(*grads)
    weights = outputs[0].contiguous()
    B, N, W = memory.shape
    R, K = indices.shape[1], indices.shape[2]
    acc = accumulator_dtype(memory.dtype)
    grad_rows = torch.empty(B, R, K, W, dtype=acc, device=memory.device)
    grad_keys = torch.empty(B, R, W, dtype=acc, device=memory.device)
    grad_strengths = torch.empty(B, R, dtype=acc, device=memory.device)
    sparse_read_backward_kernel[(B * R,)](
        memory, indices, keys, strengths, weights, grad_weights, grad_reads, grad_rows, grad_keys, grad_strengths,
        N, R, W, K, EPS=EPS, BLOCK_K=pow2(K), BLOCK_W=pow2(W),
    )  # fmt: skip
    grad_memory = scatter_rows(memory, indices, grad_rows)
    return [grad_memory, grad_keys.to(keys.dtype), grad_strengths.to(strengths.dtype)]
