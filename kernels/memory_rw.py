"""Dense memory write (erase + add in one pass) and weighted read, on [BLOCK_N, BLOCK_W] tiles.

Sums over N (the read, grad erase, grad add) are split among S programs per batch row like
content addressing; each writes a partial and torch adds the [B, S, ...] partials.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import accumulator_dtype, block_n, contiguous, load_rows, pow2, splits


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
    n_ok = n < N
    w_ok = w < W
    weight = tl.load(write_w_ptr + b * N + n, mask=n_ok, other=0.0).to(acc)[:, None]
    erase = tl.load(erase_ptr + b * W + w, mask=w_ok, other=0.0).to(acc)[None, :]
    add = tl.load(add_ptr + b * W + w, mask=w_ok, other=0.0).to(acc)[None, :]
    at = (b * N + n[:, None]) * W + w[None, :]
    mask = n_ok[:, None] & w_ok[None, :]
    words = tl.load(memory_ptr + at, mask=mask, other=0.0).to(acc)
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
    w_ok = w < W
    erase = tl.load(erase_ptr + b * W + w, mask=w_ok, other=0.0).to(acc)[None, :]
    add = tl.load(add_ptr + b * W + w, mask=w_ok, other=0.0).to(acc)[None, :]
    grad_erase = tl.zeros([BLOCK_W], acc)
    grad_add = tl.zeros([BLOCK_W], acc)
    start = split * tiles_per_program * BLOCK_N
    for tile in range(tiles_per_program):
        n = start + tile * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        weight = tl.load(write_w_ptr + b * N + n, mask=n_ok, other=0.0).to(acc)[:, None]
        at = (b * N + n[:, None]) * W + w[None, :]
        mask = n_ok[:, None] & w_ok[None, :]
        words = tl.load(memory_ptr + at, mask=mask, other=0.0).to(acc)
        grad = tl.load(grad_out_ptr + at, mask=mask, other=0.0).to(acc)
        tl.store(grad_memory_ptr + at, grad * (1 - weight * erase), mask=mask)
        tl.store(grad_w_ptr + b * N + n, tl.sum(grad * (add - words * erase), 1), mask=n_ok)
        grad_erase -= tl.sum(weight * grad * words, 0)
        grad_add += tl.sum(weight * grad, 0)
    part = (b * tl.num_programs(1) + split) * W + w
    tl.store(grad_erase_part_ptr + part, grad_erase, mask=w_ok)
    tl.store(grad_add_part_ptr + part, grad_add, mask=w_ok)


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
    r_ok = r < R
    w_ok = w < W
    reads = tl.zeros([BLOCK_R, BLOCK_W], acc)
    start = split * tiles_per_program * BLOCK_N
    for tile in range(tiles_per_program):
        n = start + tile * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        words = load_rows(memory_ptr, b * N, n, n_ok, W, w, w_ok, acc)
        weights = tl.load(
            read_w_ptr + (b * R + r[:, None]) * N + n[None, :], mask=r_ok[:, None] & n_ok[None, :], other=0.0
        )
        reads += tl.sum(weights.to(acc)[:, :, None] * words[None, :, :], 1)
    part = (b * tl.num_programs(1) + split) * R + r
    tl.store(reads_part_ptr + part[:, None] * W + w[None, :], reads, mask=r_ok[:, None] & w_ok[None, :])


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
    r_ok = r < R
    w_ok = w < W
    n_ok = n < N
    grad_reads = tl.load(
        grad_reads_ptr + (b * R + r[:, None]) * W + w[None, :], mask=r_ok[:, None] & w_ok[None, :], other=0.0
    ).to(acc)
    at = (b * N + n[:, None]) * W + w[None, :]
    mask = n_ok[:, None] & w_ok[None, :]
    words = tl.load(memory_ptr + at, mask=mask, other=0.0).to(acc)
    rn = (b * R + r[:, None]) * N + n[None, :]
    rn_mask = r_ok[:, None] & n_ok[None, :]
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
    BLOCK_N = block_n(N, W)
    S, tiles_per_program = splits(triton.cdiv(N, BLOCK_N), B, memory.device)
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
    BLOCK_N = block_n(N, R, W)
    S, tiles_per_program = splits(triton.cdiv(N, BLOCK_N), B, memory.device)
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
