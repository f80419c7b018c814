"""topk_content: fused score + top-K over memory (sparsemem.ops.topk_content).

S programs per batch row each score their share of the N slots against all R heads and keep, per
head, the K best (score, slot) in registers; a second kernel merges the S partial lists. No
[B, R, N] score tensor exists, only [B, S, R, K] partials. Order: score descending, ties by slot
ascending (a total order, the same as the C++ kernel's). The backward writes the gradient of each
gathered row, [B, R, K, W]; one scatter-add puts them into the dense memory gradient the op
promises, in a fixed order (no atomics), so repeated slots add up deterministically.
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
    load_rows,
    memory_tile,
    norms,
    pow2,
    scatter_rows,
    split_n,
    split_slots,
    tile_at,
)


@triton.jit
def _take_best(best, best_slot, candidates, candidate_slots, k, BLOCK_K: tl.constexpr):
    # The k best of best [BLOCK_R, BLOCK_K] (sorted) and candidates [BLOCK_R, BLOCK_C], by
    # (score descending, slot ascending): k rounds, each taking the larger of the two maxima.
    # Taken entries become -inf; padding is -inf, so it is only taken once real entries run out.
    position = tl.arange(0, BLOCK_K)[None, :]
    merged = tl.full(best.shape, float("-inf"), best.dtype)
    merged_slot = tl.zeros(best_slot.shape, tl.int64)
    for j in range(k):
        top = tl.max(candidates, 1)
        top_slot = tl.min(tl.where(candidates == top[:, None], candidate_slots, 2**62), 1)
        kept = tl.max(best, 1)
        kept_slot = tl.min(tl.where(best == kept[:, None], best_slot, 2**62), 1)
        from_best = (kept > top) | ((kept == top) & (kept_slot < top_slot))
        score = tl.where(from_best, kept, top)
        slot = tl.where(from_best, kept_slot, top_slot)
        merged = tl.where(position == j, score[:, None], merged)
        merged_slot = tl.where(position == j, slot[:, None], merged_slot)
        taken = slot[:, None]
        candidates = tl.where((candidate_slots == taken) & ~from_best[:, None], float("-inf"), candidates)
        best = tl.where((best_slot == taken) & from_best[:, None], float("-inf"), best)
    return merged, merged_slot


@triton.jit
def topk_partial_kernel(
    memory_ptr,
    keys_ptr,
    part_scores_ptr,
    part_slots_ptr,
    N,
    R,
    W,
    k,
    tiles_per_program,
    EPS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # One program: batch row b, slots [start, start + tiles_per_program * BLOCK_N), all R heads.
    # Registers: keys [BLOCK_R, BLOCK_W], one memory tile [BLOCK_N, BLOCK_W], its scores
    # [BLOCK_R, BLOCK_N] and the running best [BLOCK_R, BLOCK_K]. A tile whose best score is
    # below every head's k-th is skipped without a merge (the common case once the list fills).
    b = tl.program_id(0)
    split = tl.program_id(1)
    acc = part_scores_ptr.dtype.element_ty
    r = tl.arange(0, BLOCK_R)
    w = tl.arange(0, BLOCK_W)
    r_ok = r < R
    w_ok = w < W
    keys = load_rows(keys_ptr, b * R, r, r_ok, W, w, w_ok, acc)
    key_norm = norms(keys, EPS)
    best = tl.full([BLOCK_R, BLOCK_K], float("-inf"), acc)
    best_slot = tl.zeros([BLOCK_R, BLOCK_K], tl.int64)
    for tile in range(tiles_per_program):
        n = split_slots(split, tile, tiles_per_program, BLOCK_N)
        n_ok = n < N
        _, word_norm, dots = memory_tile(memory_ptr, b, N, W, n, w, w_ok, keys, EPS)
        scores = dots / (key_norm[:, None] * word_norm[None, :])
        scores = tl.where(n_ok[None, :] & r_ok[:, None], scores, float("-inf"))
        kth = tl.min(tl.where(tl.arange(0, BLOCK_K)[None, :] < k, best, float("inf")), 1)
        if tl.sum(((tl.max(scores, 1) >= kth) & r_ok).to(tl.int32)) > 0:
            slots = n.to(tl.int64)[None, :] + tl.zeros([BLOCK_R, BLOCK_N], tl.int64)
            best, best_slot = _take_best(best, best_slot, scores, slots, k, BLOCK_K)
    part = ((b * tl.num_programs(1) + split) * R + r[:, None]) * k + tl.arange(0, BLOCK_K)[None, :]
    mask = r_ok[:, None] & (tl.arange(0, BLOCK_K)[None, :] < k)
    tl.store(part_scores_ptr + part, best, mask=mask)
    tl.store(part_slots_ptr + part, best_slot, mask=mask)


@triton.jit
def topk_merge_kernel(
    part_scores_ptr,
    part_slots_ptr,
    scores_ptr,
    indices_ptr,
    R,
    S,
    k,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # One program per batch row: the S * k partial candidates per head [BLOCK_R, BLOCK_C] in
    # registers, the k best taken as in the partial kernel.
    b = tl.program_id(0)
    acc = part_scores_ptr.dtype.element_ty
    r = tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_C)
    r_ok = r < R
    c_ok = c < S * k
    # candidate c of head r is partial (split c // k, rank c % k)
    at = ((b * S + c[None, :] // k) * R + r[:, None]) * k + c[None, :] % k
    mask = r_ok[:, None] & c_ok[None, :]
    candidates = tl.load(part_scores_ptr + at, mask=mask, other=float("-inf"))
    candidate_slots = tl.load(part_slots_ptr + at, mask=mask, other=0)
    best = tl.full([BLOCK_R, BLOCK_K], float("-inf"), acc)
    best_slot = tl.zeros([BLOCK_R, BLOCK_K], tl.int64)
    best, best_slot = _take_best(best, best_slot, candidates, candidate_slots, k, BLOCK_K)
    out = (b * R + r[:, None]) * k + tl.arange(0, BLOCK_K)[None, :]
    out_mask = r_ok[:, None] & (tl.arange(0, BLOCK_K)[None, :] < k)
    tl.store(scores_ptr + out, best, mask=out_mask)
    tl.store(indices_ptr + out, best_slot, mask=out_mask)


def topk_content_forward(memory: Tensor, keys: Tensor, k: int) -> tuple[Tensor, Tensor]:
    memory, keys = contiguous(memory, keys)
    B, N, W = memory.shape
    R = keys.shape[1]
    if not 1 <= k <= N:  # as the cpp kernel: the merge reads k candidates of each partial
        raise ValueError(f"k must be in [1, N={N}]; got k={k}")
    acc = accumulator_dtype(memory.dtype)
    BLOCK_K = pow2(k)
    tile, S, tiles_per_program = split_n(N, B, memory.device, R, W)
    part_scores = torch.empty(B, S, R, k, dtype=acc, device=memory.device)
    part_slots = torch.empty(B, S, R, k, dtype=torch.int64, device=memory.device)
    common = dict(BLOCK_R=pow2(R), BLOCK_K=BLOCK_K)
    topk_partial_kernel[(B, S)](
        memory, keys, part_scores, part_slots, N, R, W, k, tiles_per_program,
        EPS=EPS, BLOCK_N=tile, BLOCK_W=pow2(W), **common,
    )  # fmt: skip
    scores = torch.empty(B, R, k, dtype=acc, device=memory.device)
    indices = torch.empty(B, R, k, dtype=torch.int64, device=memory.device)
    topk_merge_kernel[(B,)](part_scores, part_slots, scores, indices, R, S, k, BLOCK_C=pow2(S * k), **common)
    return scores.to(memory.dtype), indices


@triton.jit
def topk_content_backward_kernel(
    memory_ptr,
    keys_ptr,
    indices_ptr,
    grad_scores_ptr,
    grad_rows_ptr,
    grad_keys_ptr,
    N,
    R,
    W,
    k,
    EPS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    # One program per head (b, r): its k rows [BLOCK_K, BLOCK_W] gathered into registers.
    head = tl.program_id(0)
    acc = grad_rows_ptr.dtype.element_ty
    j = tl.arange(0, BLOCK_K)
    w = tl.arange(0, BLOCK_W)
    rows, key, key_norm = gather_head(memory_ptr, indices_ptr, keys_ptr, head, N, R, W, k, acc, EPS, BLOCK_K, BLOCK_W)
    grad_scores = tl.load(grad_scores_ptr + head * k + j, mask=j < k, other=0.0).to(acc)
    grad_rows, grad_key = gathered_cosine_backward(rows, key, key_norm, grad_scores, EPS)
    at, mask = tile_at(head, j, k, w, W)  # [B, R, k, W]
    tl.store(grad_rows_ptr + at, grad_rows, mask=mask)
    tl.store(grad_keys_ptr + head * W + w, grad_key, mask=w < W)


def topk_content_backward(grads: list[Tensor], inputs: list[Tensor], outputs: list[Tensor]) -> list[Tensor]:
    """grads [grad_scores], inputs [memory, keys] -> [grad_memory, grad_keys]."""
    memory, keys, grad_scores, indices = contiguous(*inputs, grads[0], outputs[1])
    B, N, W = memory.shape
    R, k = indices.shape[1], indices.shape[2]
    acc = accumulator_dtype(memory.dtype)
    grad_rows = torch.empty(B, R, k, W, dtype=acc, device=memory.device)
    grad_keys = torch.empty(B, R, W, dtype=acc, device=memory.device)
    topk_content_backward_kernel[(B * R,)](
        memory, keys, indices, grad_scores, grad_rows, grad_keys, N, R, W, k,
        EPS=EPS, BLOCK_K=pow2(k), BLOCK_W=pow2(W),
    )  # fmt: skip
    return [scatter_rows(memory, indices, grad_rows), grad_keys.to(keys.dtype)]
