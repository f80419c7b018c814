"""NTM addressing: content weights (content.py's kernels), then per head row of [N]
    g = gate c + (1 - gate) w_prev;  s[i] = sum_j shift[j] g[(i - o_j) mod N], o_j = j - S // 2;
    w = (s / max s)^gamma / sum (s / max s)^gamma
in one program per (b, r) row that walks N a tile at a time (csrc/cpu/ntm.cpp has the equations
of the backward). A tile reads g at the S shifted places straight from c and w_prev, so no pass
needs a neighbouring tile's registers; the passes over a row share a scratch row in global memory
(s, then grad s), each written and read back by the same program, with a barrier in between.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import accumulator_dtype, contiguous, pow2
from .content import content_weights_backward, content_weights_forward


@triton.jit
def _power(x, exponent):
    """x^exponent for x >= 0 (0^0 = 1, as torch.pow)."""
    safe = tl.where(x > 0, x, 1.0)
    return tl.where(x > 0, tl.exp(exponent * tl.log(safe)), tl.where(exponent == 0, 1.0, 0.0))


@triton.jit
def _shifted(row, n, mask, N, S, content_ptr, prev_ptr, shift_ptr, gate):
    """s over the row's tile n: sum_j shift[j] g[(n - o_j) mod N], g read at each shifted place."""
    total = tl.zeros(n.shape, dtype=gate.dtype)
    for j in range(S):
        at = (n - (j - S // 2) + N * S) % N  # + N S: never negative, so % is a true modulo
        c = tl.load(content_ptr + row * N + at, mask=mask, other=0.0).to(gate.dtype)
        p = tl.load(prev_ptr + row * N + at, mask=mask, other=0.0).to(gate.dtype)
        total += tl.load(shift_ptr + row * S + j).to(gate.dtype) * (gate * c + (1 - gate) * p)
    return total


@triton.jit
def ntm_forward_kernel(
    content_ptr, prev_ptr, gate_ptr, shift_ptr, sharpen_ptr, weights_ptr, N, S, BLOCK_N: tl.constexpr
):
    row = tl.program_id(0)
    gate = tl.load(gate_ptr + row).to(weights_ptr.dtype.element_ty)
    gamma = tl.load(sharpen_ptr + row).to(weights_ptr.dtype.element_ty)
    peak = tl.zeros([BLOCK_N], dtype=weights_ptr.dtype.element_ty)
    for first in range(0, N, BLOCK_N):  # s into the output row, and its max
        n = first + tl.arange(0, BLOCK_N)
        mask = n < N
        s = _shifted(row, n, mask, N, S, content_ptr, prev_ptr, shift_ptr, gate)
        tl.store(weights_ptr + row * N + n, s, mask=mask)
        peak = tl.maximum(peak, tl.where(mask, s, 0.0))
    top = tl.max(peak, axis=0)
    tl.debug_barrier()
    total = tl.zeros([BLOCK_N], dtype=weights_ptr.dtype.element_ty)
    for first in range(0, N, BLOCK_N):  # (s / max s)^gamma in place, and its sum
        n = first + tl.arange(0, BLOCK_N)
        mask = n < N
        q = _power(tl.load(weights_ptr + row * N + n, mask=mask, other=0.0) / top, gamma)
        tl.store(weights_ptr + row * N + n, q, mask=mask)
        total += tl.where(mask, q, 0.0)
    inverse = 1 / tl.sum(total, axis=0)
    tl.debug_barrier()
    for first in range(0, N, BLOCK_N):
        n = first + tl.arange(0, BLOCK_N)
        mask = n < N
        tl.store(weights_ptr + row * N + n, tl.load(weights_ptr + row * N + n, mask=mask) * inverse, mask=mask)


@triton.jit
def ntm_backward_kernel(
    content_ptr,
    prev_ptr,
    gate_ptr,
    shift_ptr,
    sharpen_ptr,
    weights_ptr,
    grad_weights_ptr,
    scratch_ptr,
    grad_content_ptr,
    grad_prev_ptr,
    grad_gate_ptr,
    grad_shift_ptr,
    grad_sharpen_ptr,
    N,
    S,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0)
    acc = scratch_ptr.dtype.element_ty
    gate = tl.load(gate_ptr + row).to(acc)
    gamma = tl.load(sharpen_ptr + row).to(acc)
    peak = tl.zeros([BLOCK_N], dtype=acc)
    dot = tl.zeros([BLOCK_N], dtype=acc)
    for first in range(0, N, BLOCK_N):  # s into the scratch row; max s; d = sum gw w
        n = first + tl.arange(0, BLOCK_N)
        mask = n < N
        s = _shifted(row, n, mask, N, S, content_ptr, prev_ptr, shift_ptr, gate)
        tl.store(scratch_ptr + row * N + n, s, mask=mask)
        peak = tl.maximum(peak, tl.where(mask, s, 0.0))
        w = tl.load(weights_ptr + row * N + n, mask=mask, other=0.0).to(acc)
        dot += w * tl.load(grad_weights_ptr + row * N + n, mask=mask, other=0.0).to(acc)
    top = tl.max(peak, axis=0)
    d = tl.sum(dot, axis=0)
    tl.debug_barrier()
    total = tl.zeros([BLOCK_N], dtype=acc)
    for first in range(0, N, BLOCK_N):
        n = first + tl.arange(0, BLOCK_N)
        mask = n < N
        total += tl.where(mask, _power(tl.load(scratch_ptr + row * N + n, mask=mask, other=0.0) / top, gamma), 0.0)
    scale = gamma / (top * tl.sum(total, axis=0))
    grad_gamma = tl.zeros([BLOCK_N], dtype=acc)
    for first in range(0, N, BLOCK_N):  # grad s in place of s
        n = first + tl.arange(0, BLOCK_N)
        mask = n < N
        ratio = tl.load(scratch_ptr + row * N + n, mask=mask, other=0.0) / top
        w = tl.load(weights_ptr + row * N + n, mask=mask, other=0.0).to(acc)
        centred = tl.load(grad_weights_ptr + row * N + n, mask=mask, other=0.0).to(acc) - d
        tl.store(scratch_ptr + row * N + n, scale * _power(ratio, gamma - 1) * centred, mask=mask)
        # 0 ln 0 = 0 where the weight underflowed, as torch's pow backward takes it
        grad_gamma += tl.where(mask & (w > 0), centred * w * tl.log(tl.where(w > 0, ratio, 1.0)), 0.0)
    tl.store(grad_sharpen_ptr + row, tl.sum(grad_gamma, axis=0))
    tl.debug_barrier()
    js = tl.arange(0, BLOCK_S)
    grad_shift = tl.zeros([BLOCK_S], dtype=acc)
    grad_gate = tl.zeros([BLOCK_N], dtype=acc)
    for first in range(0, N, BLOCK_N):
        n = first + tl.arange(0, BLOCK_N)
        mask = n < N
        c = tl.load(content_ptr + row * N + n, mask=mask, other=0.0).to(acc)
        p = tl.load(prev_ptr + row * N + n, mask=mask, other=0.0).to(acc)
        g = gate * c + (1 - gate) * p
        grad_g = tl.zeros([BLOCK_N], dtype=acc)
        for j in range(S):  # grad g[i] = sum_j shift[j] grad s[i + o_j]; grad shift[j] = sum_i grad s[i + o_j] g[i]
            at = (n + (j - S // 2) + N * S) % N
            from_s = tl.load(scratch_ptr + row * N + at, mask=mask, other=0.0)
            grad_g += tl.load(shift_ptr + row * S + j).to(acc) * from_s
            grad_shift += tl.where(js == j, tl.sum(from_s * g, axis=0), 0.0)
        tl.store(grad_content_ptr + row * N + n, gate * grad_g, mask=mask)
        tl.store(grad_prev_ptr + row * N + n, (1 - gate) * grad_g, mask=mask)
        grad_gate += tl.where(mask, grad_g * (c - p), 0.0)
    tl.store(grad_gate_ptr + row, tl.sum(grad_gate, axis=0))
    tl.store(grad_shift_ptr + row * S + js, grad_shift, mask=js < S)


def _block(N: int) -> int:
    return min(pow2(N), 1024)


def ntm_address_forward(
    memory: Tensor, key: Tensor, strength: Tensor, gate: Tensor, shift: Tensor, sharpen: Tensor, prev_w: Tensor
) -> Tensor:
    content = content_weights_forward(memory, key, strength)
    gate, shift, sharpen, prev_w = contiguous(gate, shift, sharpen, prev_w)
    B, R, N = content.shape
    weights = torch.empty(B, R, N, dtype=accumulator_dtype(memory.dtype), device=memory.device)
    ntm_forward_kernel[(B * R,)](content, prev_w, gate, shift, sharpen, weights, N, shift.shape[-1], BLOCK_N=_block(N))
    return weights.to(memory.dtype)


def ntm_address_backward(grads, inputs, outputs):
    memory, key, strength, gate, shift, sharpen, prev_w = inputs
    content = content_weights_forward(memory, key, strength)
    gate, shift, sharpen, prev_w = contiguous(gate, shift, sharpen, prev_w)
    grad_weights, weights = contiguous(grads[0], outputs[0])
    B, R, N = content.shape
    S = shift.shape[-1]
    acc = accumulator_dtype(memory.dtype)
    scratch = torch.empty(B, R, N, dtype=acc, device=memory.device)
    grad_content, grad_prev = torch.empty_like(scratch), torch.empty_like(scratch)
    grad_gate, grad_sharpen = torch.empty(B, R, dtype=acc, device=memory.device), torch.empty_like(gate, dtype=acc)
    grad_shift = torch.empty(B, R, S, dtype=acc, device=memory.device)
    ntm_backward_kernel[(B * R,)](
        content,
        prev_w,
        gate,
        shift,
        sharpen,
        weights,
        grad_weights,
        scratch,
        grad_content,
        grad_prev,
        grad_gate,
        grad_shift,
        grad_sharpen,
        N,
        S,
        BLOCK_N=_block(N),
        BLOCK_S=pow2(S),
    )
    grad_memory, grad_key, grad_strength = content_weights_backward(
        [grad_content.to(memory.dtype)], (memory, key, strength), [content]
    )
    dtype = memory.dtype
    return (
        grad_memory,
        grad_key,
        grad_strength,
        grad_gate.to(dtype),
        grad_shift.to(dtype),
        grad_sharpen.to(dtype),
        grad_prev.to(dtype),
    )
