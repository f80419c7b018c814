"""Dense memory write (erase + add in one pass) and weighted read, on [BLOCK_N, BLOCK_W] tiles.

Sums over N (the read, grad erase, grad add) are split among S programs per batch row like
content addressing; each writes a partial and torch adds the [B, S, ...] partials.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import accumulator_dtype, block_n, contiguous, load_rows, pow2, split_n, split_slots, tile_at


@triton.jit
def _write_tile(memory_ptr, write_w_ptr, b, N, W, n, w, acc: tl.constexpr):
    # Slots n of batch row b, what a write to them reads: -> (offsets and mask of the
    # [BLOCK_N, BLOCK_W] tile, the words, their write weights [BLOCK_N, 1]); 0 past N and W.
    at, mask = tile_at(b, n, N, w, W)
    words = tl.load(memory_ptr + at, mask=mask, other=0.0).to(acc)
    weight = tl.load(write_w_ptr + b * N + n, mask=n < N, other=0.0).to(acc)[:, None]
    return at, mask, words, weight


@triton.jit
def _erase_add(erase_ptr, add_ptr, b, W, w, acc: tl.constexpr):
    # batch row b's erase and add vectors as [1, BLOCK_W] rows, 0 past W
    erase = tl.load(erase_ptr + b * W + w, mask=w < W, other=0.0).to(acc)[None, :]
    return erase, tl.load(add_ptr + b * W + w, mask=w < W, other=0.0).to(acc)[None, :]


@triton.jit
def memory_write_kernel(
    memory_ptr, write_w_ptr, erase_ptr, add_ptr, out_ptr, N, W, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr
):
    # One program per (b, slot block): M' = M (1 - w e^T) + w v^T on one [BLOCK_N, BLOCK_W] tile;
    # erase and add [BLOCK_W] and the tile's weights [BLOCK_N] in registers.
    b = tl.program_id(0)
    acc = tl.float64 if memory_ptr.dtype.element_ty == tl.float64 else tl.float32
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    w = tl.arange(0, BLOCK_W)
    erase, add = _erase_add(erase_ptr, add_ptr, b, W, w, acc)
    at, mask, words, weight = _write_tile(memory_ptr, write_w_ptr, b, N, W, n, w, acc)
    tl.store(out_ptr + at, words * (1 - weight * erase) + weight * add, mask=mask)


@triton.jit
def memory_write_backward_kernel(
    memory_ptr,
    write_w_ptr,
    erase_ptr,
    add_ptr,
    grad_out_ptr,
    grad_memory_ptr,
    grad_w_ptr,
    grad_erase_part_ptr,
    grad_add_part_ptr,
    N,
    W,
    tiles_per_program,
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    # One program per (b, split of N), walking [BLOCK_N, BLOCK_W] tiles, with G = dM':
    #   dM = G (1 - w e^T);  dw_n = sum_w G (v - M e);  de = -sum_n w_n G M;  dv = sum_n w_n G.
    # de and dv accumulate in registers [BLOCK_W] and are written as this split's partials.
    b = tl.program_id(0)
    split = tl.program_id(1)
    acc = grad_w_ptr.dtype.element_ty
    w = tl.arange(0, BLOCK_W)
    erase, add = _erase_add(erase_ptr, add_ptr, b, W, w, acc)
    grad_erase = tl.zeros([BLOCK_W], acc)
    grad_add = tl.zeros([BLOCK_W], acc)
    for tile in range(tiles_per_program):
        n = split_slots(split, tile, tiles_per_program, BLOCK_N)
        at, mask, words, weight = _write_tile(memory_ptr, write_w_ptr, b, N, W, n, w, acc)
        grad = tl.load(grad_out_ptr + at, mask=mask, other=0.0).to(acc)
        tl.store(grad_memory_ptr + at, grad * (1 - weight * erase), mask=mask)
        tl.store(grad_w_ptr + b * N + n, tl.sum(grad * (add - words * erase), 1), mask=n < N)
        grad_erase -= tl.sum(weight * grad * words, 0)
        grad_add += tl.sum(weight * grad, 0)
    part = (b * tl.num_programs(1) + split) * W + w
    tl.store(grad_erase_part_ptr + part, grad_erase, mask=w < W)
    tl.store(grad_add_part_ptr + part, grad_add, mask=w < W)


@triton.jit
def memory_read_kernel(
    memory_ptr,
    read_w_ptr,
    reads_part_ptr,
    N,
    R,
    W,
    tiles_per_program,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    # One program per (b, split of N), all R heads: reads [BLOCK_R, BLOCK_W] accumulate in
    # registers over [BLOCK_N, BLOCK_W] memory tiles, each read once.
    b = tl.program_id(0)
    split = tl.program_id(1)
    acc = reads_part_ptr.dtype.element_ty
    r = tl.arange(0, BLOCK_R)
    w = tl.arange(0, BLOCK_W)
    reads = tl.zeros([BLOCK_R, BLOCK_W], acc)
    for tile in range(tiles_per_program):
        n = split_slots(split, tile, tiles_per_program, BLOCK_N)
        words = load_rows(memory_ptr, b * N, n, n < N, W, w, w < W, acc)
        rn, rn_mask = tile_at(b, r, R, n, N)
        weights = tl.load(read_w_ptr + rn, mask=rn_mask, other=0.0)
        reads += tl.sum(weights.to(acc)[:, :, None] * words[None, :, :], 1)
    part, part_mask = tile_at(b * tl.num_programs(1) + split, r, R, w, W)  # [B, S, R, W]
    tl.store(reads_part_ptr + part, reads, mask=part_mask)


@triton.jit
def memory_read_backward_kernel(
    memory_ptr,
    read_w_ptr,
    grad_reads_ptr,
    grad_memory_ptr,
    grad_read_w_ptr,
    N,
    R,
    W,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    # One program per (b, slot block): dM_n = sum_r w_rn dr_r and dw_rn = dr_r . M_n, from one
    # memory tile [BLOCK_N, BLOCK_W] and the read grads [BLOCK_R, BLOCK_W] in registers.
    b = tl.program_id(0)
    acc = tl.float64 if memory_ptr.dtype.element_ty == tl.float64 else tl.float32
    r = tl.arange(0, BLOCK_R)
    w = tl.arange(0, BLOCK_W)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rw, rw_mask = tile_at(b, r, R, w, W)
    grad_reads = tl.load(grad_reads_ptr + rw, mask=rw_mask, other=0.0).to(acc)
    at, mask = tile_at(b, n, N, w, W)
    words = tl.load(memory_ptr + at, mask=mask, other=0.0).to(acc)
    rn, rn_mask = tile_at(b, r, R, n, N)
    weights = tl.load(read_w_ptr + rn, mask=rn_mask, other=0.0).to(acc)
    tl.store(grad_memory_ptr + at, tl.sum(weights[:, :, None] * grad_reads[:, None, :], 0), mask=mask)
    tl.store(grad_read_w_ptr + rn, tl.sum(grad_reads[:, None, :] * words[None, :, :], 2), mask=rn_mask)


def memory_write_forward(memory: Tensor, write_w: Tensor, erase: Tensor, add: Tensor) -> Tensor:
    memory, write_w, erase, add = contiguous(memory, write_w, erase, add)
    B, N, W = memory.shape
    BLOCK_N = block_n(N, W)
    out = torch.empty_like(memory)
    memory_write_kernel[(B, triton.cdiv(N, BLOCK_N))](
        memory, write_w, erase, add, out, N, W, BLOCK_N=BLOCK_N, BLOCK_W=pow2(W)
    )
    return out


def memory_write_backward(grads, inputs, outputs) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    memory, write_w, erase, add = contiguous(*inputs)
    grad_out = grads[0].contiguous()
    B, N, W = memory.shape
    acc = accumulator_dtype(memory.dtype)
    BLOCK_N, S, tiles_per_program = split_n(N, B, memory.device, W)
    grad_memory = torch.empty_like(memory)
    grad_w = torch.empty(B, N, dtype=acc, device=memory.device)
    grad_erase_part, grad_add_part = torch.empty(2, B, S, W, dtype=acc, device=memory.device)
    memory_write_backward_kernel[(B, S)](
        memory,
        write_w,
        erase,
        add,
        grad_out,
        grad_memory,
        grad_w,
        grad_erase_part,
        grad_add_part,
        N,
        W,
        tiles_per_program,
        BLOCK_N=BLOCK_N,
        BLOCK_W=pow2(W),
    )
    dtype = memory.dtype
    return grad_memory, grad_w.to(dtype), grad_erase_part.sum(1).to(dtype), grad_add_part.sum(1).to(dtype)


def memory_read_forward(memory: Tensor, read_w: Tensor) -> Tensor:
    memory, read_w = contiguous(memory, read_w)
    B, N, W = memory.shape
    R = read_w.shape[1]
    BLOCK_N, S, tiles_per_program = split_n(N, B, memory.device, R, W)
    reads_part = torch.empty(B, S, R, W, dtype=accumulator_dtype(memory.dtype), device=memory.device)
    memory_read_kernel[(B, S)](
        memory,
        read_w,
        reads_part,
        N,
        R,
        W,
        tiles_per_program,
        BLOCK_N=BLOCK_N,
        BLOCK_R=pow2(R),
        BLOCK_W=pow2(W),
    )
    return reads_part.sum(1).to(memory.dtype)


def memory_read_backward(grads, inputs, outputs) -> tuple[Tensor, Tensor]:
    memory, read_w = contiguous(*inputs)
    grad_reads = grads[0].contiguous()
    B, N, W = memory.shape
    R = read_w.shape[1]
    BLOCK_N = block_n(N, R, W)
    grad_memory = torch.empty_like(memory)
    grad_read_w = torch.empty_like(read_w)
    memory_read_backward_kernel[(B, triton.cdiv(N, BLOCK_N))](
        memory,
        read_w,
        grad_reads,
        grad_memory,
        grad_read_w,
        N,
        R,
        W,
        BLOCK_N=BLOCK_N,
        BLOCK_R=pow2(R),
        BLOCK_W=pow2(W),
    )
    return grad_memory, grad_read_w
