"""Sparse access (SAM): fused score + top-K over memory, reads over K gathered rows, writes on J rows.

topk_content: S programs per batch row each score their share of the N slots against all R heads
and keep, per head, the K best (score, slot) in registers; a second kernel merges the S partial
lists. No [B, R, N] score tensor exists, only [B, S, R, K] partials. Order: score descending,
ties by slot ascending (a total order, the same as the C++ kernel's).

sparse_read: one program per head gathers its K rows, scores them, takes the softmax over the K
and the read, all in registers. Backward kernels (topk_content, sparse_read) write the gradient of
each gathered row, [B, R, K, W]; one scatter-add puts them into the dense memory gradient the ops
promise, in a fixed order (no atomics), so repeated slots add up deterministically.

journaled_write: sparse_write in place on a memory's row store; one program per batch row gathers
its J old rows (the journal entry) before sparse_write's kernel computes the new rows and torch
stores them, so no entry reads a row another entry of the call wrote.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    EPS,
    accumulator_dtype,
    block_n,
    contiguous,
    load_rows,
    memory_tile,
    norm,
    norms,
    pow2,
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
def gathered_cosine_backward(rows, key, key_norm, grad_similarity, EPS: tl.constexpr):
    # s_j = D(key, x_j) = key . x_j / (a m_j); given gs_j = dL/ds_j, for the head's rows x
    # [BLOCK_K, BLOCK_W] (zero past K):
    #   grad x_j = gs_j (key / (a m_j) - s_j x_j / m_j^2),  grad key = sum_j gs_j (x_j / (a m_j) - s_j key / a^2).
    word_norm = norms(rows, EPS)
    similarity = tl.sum(rows * key[None, :], 1) / (key_norm * word_norm)
    cross = grad_similarity / (key_norm * word_norm)
    grad_rows = cross[:, None] * key[None, :] - (grad_similarity * similarity / (word_norm * word_norm))[:, None] * rows
    grad_key = tl.sum(cross[:, None] * rows, 0) - tl.sum(grad_similarity * similarity) / (key_norm * key_norm) * key
    return grad_rows, grad_key


@triton.jit
def gather_head(memory_ptr, indices_ptr, keys_ptr, head, N, R, W, K, acc: tl.constexpr, EPS: tl.constexpr,
                BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr):  # fmt: skip
    # Head (b, r)'s K rows of memory [BLOCK_K, BLOCK_W] (0 past K) and its key [BLOCK_W], with ||key||.
    j = tl.arange(0, BLOCK_K)
    w = tl.arange(0, BLOCK_W)
    slots = tl.load(indices_ptr + head * K + j, mask=j < K, other=0)
    rows = load_rows(memory_ptr, head // R * N, slots, j < K, W, w, w < W, acc)
    key = tl.load(keys_ptr + head * W + w, mask=w < W, other=0.0).to(acc)
    return rows, key, norm(key, EPS)


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


def _scatter_rows(memory: Tensor, indices: Tensor, grad_rows: Tensor) -> Tensor:
    """The dense [B, N, W] memory gradient from the gradients of the gathered rows [B, R, K, W]."""
    B, N, W = memory.shape
    grad_memory = torch.zeros(B, N, W, dtype=grad_rows.dtype, device=memory.device)
    flat = indices.reshape(B, -1, 1).expand(-1, -1, W)
    return grad_memory.scatter_add_(1, flat, grad_rows.reshape(B, -1, W)).to(memory.dtype)


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
    return [_scatter_rows(memory, indices, grad_rows), grad_keys.to(keys.dtype)]


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
    grad_memory = _scatter_rows(memory, indices, grad_rows)
    return [grad_memory, grad_keys.to(keys.dtype), grad_strengths.to(strengths.dtype)]


@triton.jit
def sparse_write_kernel(
    rows_ptr,
    weights_ptr,
    add_ptr,
    erase_ptr,
    out_ptr,
    J,
    W,
    BLOCK_J: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    # One program per (b, block of rows): new = rows * (1 - erase) + w add^T on a [BLOCK_J, BLOCK_W] tile.
    b = tl.program_id(0)
    acc = tl.float64 if rows_ptr.dtype.element_ty == tl.float64 else tl.float32
    j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    w = tl.arange(0, BLOCK_W)
    j_ok = j < J
    w_ok = w < W
    at = (b * J + j[:, None]) * W + w[None, :]
    mask = j_ok[:, None] & w_ok[None, :]
    rows = tl.load(rows_ptr + at, mask=mask, other=0.0).to(acc)
    weight = tl.load(weights_ptr + b * J + j, mask=j_ok, other=0.0).to(acc)
    erase = tl.load(erase_ptr + b * J + j, mask=j_ok, other=0) != 0
    add = tl.load(add_ptr + b * W + w, mask=w_ok, other=0.0).to(acc)
    kept = tl.where(erase[:, None], 0.0, rows)
    tl.store(out_ptr + at, kept + weight[:, None] * add[None, :], mask=mask)


def sparse_write_forward(rows: Tensor, weights: Tensor, add: Tensor, erase_rows: Tensor) -> Tensor:
    rows, weights, add, erase_rows = contiguous(rows, weights, add, erase_rows)
    B, J, W = rows.shape
    out = torch.empty_like(rows)
    tile = block_n(J, W)
    sparse_write_kernel[(B, triton.cdiv(J, tile))](
        rows, weights, add, erase_rows.view(torch.uint8), out, J, W, BLOCK_J=tile, BLOCK_W=pow2(W)
    )
    return out


@triton.jit
def sparse_write_backward_kernel(
    grad_ptr,
    weights_ptr,
    add_ptr,
    erase_ptr,
    grad_rows_ptr,
    grad_weights_ptr,
    grad_add_ptr,
    J,
    W,
    BLOCK_J: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    # One program per batch row, walking [BLOCK_J, BLOCK_W] tiles of G = d new:
    #   grad rows = G (1 - erase),  grad w_j = G_j . add,  grad add = sum_j w_j G_j (in registers).
    b = tl.program_id(0)
    acc = grad_add_ptr.dtype.element_ty
    w = tl.arange(0, BLOCK_W)
    w_ok = w < W
    add = tl.load(add_ptr + b * W + w, mask=w_ok, other=0.0).to(acc)
    grad_add = tl.zeros([BLOCK_W], acc)
    for start in range(0, J, BLOCK_J):
        j = start + tl.arange(0, BLOCK_J)
        j_ok = j < J
        at = (b * J + j[:, None]) * W + w[None, :]
        mask = j_ok[:, None] & w_ok[None, :]
        grad = tl.load(grad_ptr + at, mask=mask, other=0.0).to(acc)
        weight = tl.load(weights_ptr + b * J + j, mask=j_ok, other=0.0).to(acc)
        erase = tl.load(erase_ptr + b * J + j, mask=j_ok, other=0) != 0
        tl.store(grad_rows_ptr + at, tl.where(erase[:, None], 0.0, grad), mask=mask)
        tl.store(grad_weights_ptr + b * J + j, tl.sum(grad * add[None, :], 1), mask=j_ok)
        grad_add += tl.sum(weight[:, None] * grad, 0)
    tl.store(grad_add_ptr + b * W + w, grad_add, mask=w_ok)


def sparse_write_backward(grads: list[Tensor], inputs: list[Tensor], outputs: list[Tensor]) -> list[Tensor]:
    """grads [grad_new_rows] -> [grad_rows, grad_weights, grad_add]."""
    rows, weights, add, erase_rows = contiguous(*inputs)
    grad = grads[0].contiguous()
    B, J, W = rows.shape
    acc = accumulator_dtype(rows.dtype)
    grad_rows = torch.empty_like(rows)
    grad_weights = torch.empty(B, J, dtype=acc, device=rows.device)
    grad_add = torch.empty(B, W, dtype=acc, device=rows.device)
    sparse_write_backward_kernel[(B,)](
        grad, weights, add, erase_rows.view(torch.uint8), grad_rows, grad_weights, grad_add, J, W,
        BLOCK_J=block_n(J, W), BLOCK_W=pow2(W),
    )  # fmt: skip
    return [grad_rows, grad_weights.to(weights.dtype), grad_add.to(add.dtype)]


@triton.jit
def journaled_gather_kernel(
    rows_ptr,
    written_ptr,
    initial_ptr,
    keys_ptr,
    old_ptr,
    fresh_ptr,
    J,
    W,
    BLOCK_J: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    # One program per batch row, its J entries in one [BLOCK_J, BLOCK_W] tile: the old rows (the
    # initial word where a key is unwritten) and fresh (unwritten, and no earlier entry has the key,
    # from a [BLOCK_J, BLOCK_J] comparison of the keys: J is SAM's R*K + 1, tens of rows).
    b = tl.program_id(0)
    j = tl.arange(0, BLOCK_J)
    w = tl.arange(0, BLOCK_W)
    j_ok = j < J
    w_ok = w < W
    mask = j_ok[:, None] & w_ok[None, :]
    keys = tl.load(keys_ptr + b * J + j, mask=j_ok, other=0)
    was = tl.load(written_ptr + keys, mask=j_ok, other=0) != 0
    rows = tl.load(rows_ptr + keys[:, None] * W + w[None, :], mask=mask & was[:, None], other=0.0)
    initial = tl.load(initial_ptr + w, mask=w_ok, other=0.0)
    tl.store(old_ptr + (b * J + j[:, None]) * W + w[None, :], tl.where(was[:, None], rows, initial[None, :]), mask=mask)
    earlier = (keys[:, None] == keys[None, :]) & (j[None, :] < j[:, None])
    repeats = tl.sum(earlier.to(tl.int32), 1)
    fresh = (repeats == 0) & (was == 0)
    tl.store(fresh_ptr + b * J + j, fresh.to(tl.uint8), mask=j_ok)


def journaled_write_forward(
    rows: Tensor, written: Tensor, initial_word: Tensor, keys: Tensor, weights: Tensor, add: Tensor, erase_rows: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """sparse_write in place on the store rows [M, W] (see sparsemem.ops.sparse.journaled_write): the
    gather kernel, sparse_write's kernel on the old rows, then the new rows stored at the keys (a
    repeated key's entries carry the same row)."""
    keys, initial_word = contiguous(keys, initial_word)
    B, J = keys.shape
    W = rows.shape[1]
    old = torch.empty(B, J, W, dtype=rows.dtype, device=rows.device)
    fresh = torch.empty(B, J, dtype=torch.bool, device=rows.device)
    journaled_gather_kernel[(B,)](
        rows, written.view(torch.uint8), initial_word, keys, old, fresh.view(torch.uint8), J, W,
        BLOCK_J=pow2(J), BLOCK_W=pow2(W),
    )  # fmt: skip
    new = sparse_write_forward(old, weights, add, erase_rows)
    flat = keys.view(-1)
    rows[flat] = new.view(-1, W)
    written[flat] = True
    return old, new, fresh
