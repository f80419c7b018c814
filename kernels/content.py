"""Content addressing in one pass over memory: cosine similarity, strength, online softmax over N.

Forward (flash-decoding layout): content_partial_kernel splits each batch row's N slots among
S programs; each reads its slots once for all R heads, writes the logits b * cos and keeps a
running max, running sum and (for content_read) running weighted sum of words. Then
content_normalize_kernel merges the S partials and turns logits into weights in place;
reads come from the merged partials, never from a second pass over weights x memory.

Backward recomputes cosines from memory (read once more) instead of storing [B, R, N] of them.
With G = grad_weights + grad_reads . M_n (the read term) the softmax gradient needs
D_r = sum_n w_rn G_rn = sum_n w_rn grad_w_rn + grad_reads_r . reads_r, which needs no memory.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    EPS,
    accumulator_dtype,
    contiguous,
    load_rows,
    memory_tile,
    norms,
    pow2,
    split_n,
    split_slots,
    tile_at,
)


@triton.jit
def content_partial_kernel(
    memory_ptr,
    keys_ptr,
    strengths_ptr,
    logits_ptr,
    max_ptr,
    sum_ptr,
    reads_ptr,
    N,
    R,
    W,
    tiles_per_program,
    EPS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_W: tl.constexpr,
    WITH_READS: tl.constexpr,
):
    # One program: batch row b, slots [start, start + tiles_per_program * BLOCK_N), all R heads.
    # Registers: the keys [BLOCK_R, BLOCK_W] scaled by strength / ||k||, one memory tile
    # [BLOCK_N, BLOCK_W], the running max / sum [BLOCK_R] and reads [BLOCK_R, BLOCK_W].
    b = tl.program_id(0)
    split = tl.program_id(1)
    acc = max_ptr.dtype.element_ty
    r = tl.arange(0, BLOCK_R)
    w = tl.arange(0, BLOCK_W)
    r_ok = r < R
    w_ok = w < W
    keys = load_rows(keys_ptr, b * R, r, r_ok, W, w, w_ok, acc)
    strength = tl.load(strengths_ptr + b * R + r, mask=r_ok, other=0.0).to(acc)
    scale = strength / norms(keys, EPS)
    running_max = tl.full([BLOCK_R], float("-inf"), acc)
    running_sum = tl.zeros([BLOCK_R], acc)
    reads = tl.zeros([BLOCK_R, BLOCK_W], acc)
    for tile in range(tiles_per_program):
        n = split_slots(split, tile, tiles_per_program, BLOCK_N)
        words, word_norm, dots = memory_tile(memory_ptr, b, N, W, n, w, w_ok, keys, EPS)
        logits = dots * scale[:, None] / word_norm[None, :]
        logits = tl.where((n < N)[None, :], logits, float("-inf"))
        rn, rn_mask = tile_at(b, r, R, n, N)
        tl.store(logits_ptr + rn, logits, mask=rn_mask)
        # A split's first tile always holds a slot < N, so new_max is finite; a tile past N
        # (-inf logits) adds exp(-inf) = 0.
        new_max = tl.maximum(running_max, tl.max(logits, 1))
        correction = tl.exp(running_max - new_max)
        p = tl.exp(logits - new_max[:, None])
        running_sum = running_sum * correction + tl.sum(p, 1)
        if WITH_READS:
            reads = reads * correction[:, None] + tl.sum(p[:, :, None] * words[None, :, :], 1)
        running_max = new_max
    part = (b * tl.num_programs(1) + split) * R + r
    tl.store(max_ptr + part, running_max, mask=r_ok)
    tl.store(sum_ptr + part, running_sum, mask=r_ok)
    if WITH_READS:
        tl.store(reads_ptr + part[:, None] * W + w[None, :], reads, mask=r_ok[:, None] & w_ok[None, :])


@triton.jit
def content_normalize_kernel(
    weights_ptr,
    max_ptr,
    sum_ptr,
    partial_reads_ptr,
    reads_ptr,
    N,
    R,
    W,
    S,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_W: tl.constexpr,
    WITH_READS: tl.constexpr,
):
    # One program: batch row b, slots [pid * BLOCK_N, +BLOCK_N). Each program merges the S
    # partials ([BLOCK_S, BLOCK_R] in registers, tiny) itself, so no extra launch is needed;
    # program 0 of the row also writes the reads.
    b = tl.program_id(0)
    s = tl.arange(0, BLOCK_S)
    r = tl.arange(0, BLOCK_R)
    r_ok = r < R
    part_ok = (s[:, None] < S) & r_ok[None, :]
    part = (b * S + s[:, None]) * R + r[None, :]
    maxes = tl.load(max_ptr + part, mask=part_ok, other=float("-inf"))
    total_max = tl.where(r_ok, tl.max(maxes, 0), 0.0)
    rescale = tl.exp(maxes - total_max[None, :])
    total = tl.sum(tl.load(sum_ptr + part, mask=part_ok, other=0.0) * rescale, 0)
    total = tl.where(r_ok, total, 1.0)
    log_total = total_max + tl.log(total)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    at = weights_ptr + (b * R + r[:, None]) * N + n[None, :]
    mask = r_ok[:, None] & (n[None, :] < N)
    tl.store(at, tl.exp(tl.load(at, mask=mask, other=0.0) - log_total[:, None]), mask=mask)
    if WITH_READS and tl.program_id(1) == 0:
        w = tl.arange(0, BLOCK_W)
        w_ok = w < W
        partial = tl.load(
            partial_reads_ptr + part[:, :, None] * W + w[None, None, :],
            mask=part_ok[:, :, None] & w_ok[None, None, :],
            other=0.0,
        )
        reads = tl.sum(partial * rescale[:, :, None], 0) / total[:, None]
        tl.store(reads_ptr + (b * R + r[:, None]) * W + w[None, :], reads, mask=r_ok[:, None] & w_ok[None, :])


@triton.jit
def content_backward_kernel(
    memory_ptr,
    keys_ptr,
    strengths_ptr,
    weights_ptr,
    grad_weights_ptr,
    grad_reads_ptr,
    softmax_dot_ptr,
    grad_memory_ptr,
    grad_keys_ptr,
    grad_strengths_ptr,
    N,
    R,
    W,
    tiles_per_program,
    EPS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_W: tl.constexpr,
    WITH_READS: tl.constexpr,
):
    # Same split as the forward. Per tile, with c = cos, t = b * dlogits / (||k|| ||M_n||):
    #   grad_M_n = sum_r t_rn k_r - (sum_r b_r dlogits_rn c_rn) M_n / ||M_n||^2 (+ sum_r w_rn grad_reads_r)
    # is final for the tile's slots; grad_k and grad_b are sums over n, kept in registers
    # ([BLOCK_R, BLOCK_W] and [BLOCK_R]) and written as this program's partial.
    b = tl.program_id(0)
    split = tl.program_id(1)
    acc = softmax_dot_ptr.dtype.element_ty
    r = tl.arange(0, BLOCK_R)
    w = tl.arange(0, BLOCK_W)
    r_ok = r < R
    w_ok = w < W
    rw_mask = r_ok[:, None] & w_ok[None, :]
    keys = load_rows(keys_ptr, b * R, r, r_ok, W, w, w_ok, acc)
    key_norm = norms(keys, EPS)
    strength = tl.load(strengths_ptr + b * R + r, mask=r_ok, other=0.0).to(acc)
    softmax_dot = tl.load(softmax_dot_ptr + b * R + r, mask=r_ok, other=0.0)
    if WITH_READS:
        grad_reads = tl.load(grad_reads_ptr + (b * R + r[:, None]) * W + w[None, :], mask=rw_mask, other=0.0).to(acc)
    grad_keys = tl.zeros([BLOCK_R, BLOCK_W], acc)
    grad_strength = tl.zeros([BLOCK_R], acc)
    for tile in range(tiles_per_program):
        n = split_slots(split, tile, tiles_per_program, BLOCK_N)
        words, word_norm, dots = memory_tile(memory_ptr, b, N, W, n, w, w_ok, keys, EPS)
        both_norms = key_norm[:, None] * word_norm[None, :]
        cos = dots / both_norms
        rn, rn_mask = tile_at(b, r, R, n, N)
        weights = tl.load(weights_ptr + rn, mask=rn_mask, other=0.0).to(acc)
        grad = tl.load(grad_weights_ptr + rn, mask=rn_mask, other=0.0).to(acc)
        if WITH_READS:
            grad += tl.sum(grad_reads[:, None, :] * words[None, :, :], 2)
        grad_logits = weights * (grad - softmax_dot[:, None])
        grad_strength += tl.sum(grad_logits * cos, 1)
        grad_cos = grad_logits * strength[:, None]
        t = grad_cos / both_norms
        grad_keys += tl.sum(t[:, :, None] * words[None, :, :], 1)
        grad_words = tl.sum(t[:, :, None] * keys[:, None, :], 0)
        grad_words -= (tl.sum(grad_cos * cos, 0) / (word_norm * word_norm))[:, None] * words
        if WITH_READS:
            grad_words += tl.sum(weights[:, :, None] * grad_reads[:, None, :], 0)
        nw, nw_mask = tile_at(b, n, N, w, W)
        tl.store(grad_memory_ptr + nw, grad_words, mask=nw_mask)
    # d cos / d k_r also has -cos k_r / ||k_r||^2; summed over n that is -(b_r grad_b_r) k_r / ||k_r||^2.
    grad_keys -= (strength * grad_strength / (key_norm * key_norm))[:, None] * keys
    part = (b * tl.num_programs(1) + split) * R + r
    tl.store(grad_keys_ptr + part[:, None] * W + w[None, :], grad_keys, mask=rw_mask)
    tl.store(grad_strengths_ptr + part, grad_strength, mask=r_ok)


def _blocks(memory: Tensor, keys: Tensor) -> dict:
    B, N, W = memory.shape
    R = keys.shape[1]
    BLOCK_N, programs, tiles_per_program = split_n(N, B, memory.device, R, W)
    return dict(BLOCK_N=BLOCK_N, BLOCK_R=pow2(R), BLOCK_W=pow2(W), S=programs, tiles_per_program=tiles_per_program)


def _forward(memory: Tensor, keys: Tensor, strengths: Tensor, with_reads: bool) -> tuple[Tensor, Tensor | None]:
    memory, keys, strengths = contiguous(memory, keys, strengths)
    B, N, W = memory.shape
    R = keys.shape[1]
    acc = accumulator_dtype(memory.dtype)
    blocks = _blocks(memory, keys)
    S = blocks["S"]
    weights = torch.empty(B, R, N, dtype=acc, device=memory.device)
    maxes = torch.empty(B, S, R, dtype=acc, device=memory.device)
    sums = torch.empty(B, S, R, dtype=acc, device=memory.device)
    partial_reads = torch.empty(B, S, R, W, dtype=acc, device=memory.device) if with_reads else maxes
    content_partial_kernel[(B, S)](
        memory,
        keys,
        strengths,
        weights,
        maxes,
        sums,
        partial_reads,
        N,
        R,
        W,
        blocks["tiles_per_program"],
        EPS=EPS,
        BLOCK_N=blocks["BLOCK_N"],
        BLOCK_R=blocks["BLOCK_R"],
        BLOCK_W=blocks["BLOCK_W"],
        WITH_READS=with_reads,
    )
    reads = torch.empty(B, R, W, dtype=acc, device=memory.device) if with_reads else maxes
    BLOCK_N = min(pow2(N), max(16, 4096 // blocks["BLOCK_R"]))
    content_normalize_kernel[(B, triton.cdiv(N, BLOCK_N))](
        weights,
        maxes,
        sums,
        partial_reads,
        reads,
        N,
        R,
        W,
        S,
        BLOCK_N=BLOCK_N,
        BLOCK_R=blocks["BLOCK_R"],
        BLOCK_S=pow2(S),
        BLOCK_W=blocks["BLOCK_W"],
        WITH_READS=with_reads,
    )
    return weights.to(memory.dtype), reads.to(memory.dtype) if with_reads else None


def _backward(grad_weights: Tensor, grad_reads: Tensor | None, inputs, weights: Tensor, reads: Tensor | None):
    memory, keys, strengths = contiguous(*inputs)
    grad_weights, weights = contiguous(grad_weights, weights)
    B, N, W = memory.shape
    R = keys.shape[1]
    acc = accumulator_dtype(memory.dtype)
    with_reads = grad_reads is not None
    softmax_dot = (weights.to(acc) * grad_weights.to(acc)).sum(-1)
    if with_reads:
        grad_reads = grad_reads.contiguous()
        softmax_dot += (grad_reads.to(acc) * reads.to(acc)).sum(-1)
    blocks = _blocks(memory, keys)
    S = blocks["S"]
    grad_memory = torch.empty_like(memory)
    grad_keys = torch.empty(B, S, R, W, dtype=acc, device=memory.device)
    grad_strengths = torch.empty(B, S, R, dtype=acc, device=memory.device)
    content_backward_kernel[(B, S)](
        memory,
        keys,
        strengths,
        weights,
        grad_weights,
        grad_reads if with_reads else grad_weights,
        softmax_dot,
        grad_memory,
        grad_keys,
        grad_strengths,
        N,
        R,
        W,
        blocks["tiles_per_program"],
        EPS=EPS,
        BLOCK_N=blocks["BLOCK_N"],
        BLOCK_R=blocks["BLOCK_R"],
        BLOCK_W=blocks["BLOCK_W"],
        WITH_READS=with_reads,
    )
    return grad_memory, grad_keys.sum(1).to(keys.dtype), grad_strengths.sum(1).to(strengths.dtype)


def content_weights_forward(memory: Tensor, keys: Tensor, strengths: Tensor) -> Tensor:
    return _forward(memory, keys, strengths, with_reads=False)[0]


def content_weights_backward(grads, inputs, outputs):
    return _backward(grads[0], None, inputs, outputs[0], None)


def content_read_forward(memory: Tensor, keys: Tensor, strengths: Tensor) -> tuple[Tensor, Tensor]:
    return _forward(memory, keys, strengths, with_reads=True)


def content_read_backward(grads, inputs, outputs):
    return _backward(grads[0], grads[1], inputs, outputs[0], outputs[1])
