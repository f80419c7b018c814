"""DNC allocation on sorted usage: a[phi_k] = (1 - s_k) P_k, P_k = prod_{i<k} s_i, s = u[phi] ascending.

The sort is global (torch.sort, stable, per batch row: ties broken by slot index); Triton does
the exclusive cumulative product and the scatter. Each row is cut into T tiles of BLOCK sorted
slots: allocation_tile_product_kernel writes every tile's product, then each program of
allocation_scatter_kernel multiplies the products of the tiles before its own (its carry) into
an in-tile scan. Two launches at any N; one (no products) when N fits one tile.

Backward without dividing by usage (finite at usages 0 and 1), with g_k = grad[phi_k]:
  grad_s_k = P_k (Q_k - g_k),   Q_k = sum_{j>k} g_j (1 - s_j) prod_{k<i<j} s_i,
  Q_k = c_{k+1} + s_{k+1} Q_{k+1},  c_j = g_j (1 - s_j),  Q_{N-1} = 0:
a linear recurrence run from the end, i.e. a scan of affine maps x -> a x + c. A tile is
walked in reverse (position i holds slot base + BLOCK - 1 - i) so both scans run forwards in
registers; its carries are the products of the tiles before it and the composed maps of the
tiles after it.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import accumulator_dtype, pow2

BLOCK = 1024


@triton.jit
def _multiply(x, y):
    return x * y


@triton.jit
def _compose(a_first, c_first, a_then, c_then):
    # the map x -> a_then (a_first x + c_first) + c_then
    return a_first * a_then, a_then * c_first + c_then


@triton.jit
def _last(values, BLOCK: tl.constexpr):
    return tl.sum(tl.where(tl.arange(0, BLOCK) == BLOCK - 1, values, 0), 0)


@triton.jit
def allocation_tile_product_kernel(sorted_ptr, products_ptr, N, BLOCK: tl.constexpr):
    # One program per (row, tile): the product of the tile's BLOCK sorted usages, in registers.
    b = tl.program_id(0)
    t = tl.program_id(1)
    k = t * BLOCK + tl.arange(0, BLOCK)
    usage = tl.load(sorted_ptr + b * N + k, mask=k < N, other=1.0).to(products_ptr.dtype.element_ty)
    tl.store(products_ptr + b * tl.num_programs(1) + t, tl.reduce(usage, 0, _multiply))


@triton.jit
def allocation_scatter_kernel(
    sorted_ptr, order_ptr, products_ptr, out_ptr, N, T, BLOCK: tl.constexpr, BLOCK_T: tl.constexpr
):
    # One program per (row, tile). Registers: the tile's BLOCK sorted usages, their in-tile
    # exclusive product, and the [BLOCK_T] products of all tiles (the carry is those before t).
    b = tl.program_id(0)
    t = tl.program_id(1)
    acc = out_ptr.dtype.element_ty
    j = tl.arange(0, BLOCK_T)
    carry = tl.reduce(tl.load(products_ptr + b * T + j, mask=j < t, other=1.0), 0, _multiply)
    base = t * BLOCK
    k = base + tl.arange(0, BLOCK)
    valid = k < N
    previous = tl.load(sorted_ptr + b * N + k - 1, mask=valid & (k > base), other=1.0).to(acc)
    exclusive = tl.cumprod(previous, 0) * carry
    usage = tl.load(sorted_ptr + b * N + k, mask=valid, other=0.0).to(acc)
    slot = tl.load(order_ptr + b * N + k, mask=valid, other=0)
    tl.store(out_ptr + b * N + slot, (1 - usage) * exclusive, mask=valid)


@triton.jit
def _backward_tile(sorted_ptr, order_ptr, grad_ptr, b, t, N, BLOCK: tl.constexpr):
    """The tile of (row b, tile t) in reverse: slots, usages, gathered grads and the maps (a, c)."""
    i = tl.arange(0, BLOCK)
    k = t * BLOCK + BLOCK - 1 - i
    valid = k < N
    nxt = k + 1 < N
    usage_next = tl.load(sorted_ptr + b * N + k + 1, mask=nxt, other=1.0)
    grad_next = tl.load(grad_ptr + b * N + tl.load(order_ptr + b * N + k + 1, mask=nxt, other=0), mask=nxt, other=0.0)
    return k, valid, usage_next, grad_next * (1 - usage_next)


@triton.jit
def allocation_backward_tile_kernel(
    sorted_ptr, order_ptr, grad_ptr, products_ptr, maps_a_ptr, maps_c_ptr, N, BLOCK: tl.constexpr
):
    # One program per (row, tile): the tile's usage product and its composed map
    # Q_base = A Q_end + C, from a [BLOCK] scan in registers.
    b = tl.program_id(0)
    t = tl.program_id(1)
    T = tl.num_programs(1)
    acc = products_ptr.dtype.element_ty
    k, valid, a, c = _backward_tile(sorted_ptr, order_ptr, grad_ptr, b, t, N, BLOCK)
    usage = tl.load(sorted_ptr + b * N + k, mask=valid, other=1.0).to(acc)
    tl.store(products_ptr + b * T + t, tl.reduce(usage, 0, _multiply))
    map_a, map_c = tl.associative_scan((a.to(acc), c.to(acc)), 0, _compose)
    tl.store(maps_a_ptr + b * T + t, _last(map_a, BLOCK))
    tl.store(maps_c_ptr + b * T + t, _last(map_c, BLOCK))


@triton.jit
def allocation_backward_kernel(
    sorted_ptr,
    order_ptr,
    grad_ptr,
    products_ptr,
    maps_a_ptr,
    maps_c_ptr,
    grad_usage_ptr,
    N,
    T,
    BLOCK: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    # One program per (row, tile), walking the tile in reverse. Registers: the [BLOCK_T] tile
    # products and maps (for the carries), and the tile's P and Q scans.
    b = tl.program_id(0)
    t = tl.program_id(1)
    acc = grad_usage_ptr.dtype.element_ty
    j = tl.arange(0, BLOCK_T)
    carry_p = tl.reduce(tl.load(products_ptr + b * T + j, mask=j < t, other=1.0), 0, _multiply)
    # Q at the end of this tile: the maps of tiles T-1, ..., t+1 applied in that order to Q_N = 0.
    later = T - 1 - j
    map_a = tl.load(maps_a_ptr + b * T + later, mask=later > t, other=1.0)
    map_c = tl.load(maps_c_ptr + b * T + later, mask=later > t, other=0.0)
    carry_q = _last(tl.associative_scan((map_a, map_c), 0, _compose)[1], BLOCK_T)

    k, valid, a, c = _backward_tile(sorted_ptr, order_ptr, grad_ptr, b, t, N, BLOCK)
    map_a, map_c = tl.associative_scan((a.to(acc), c.to(acc)), 0, _compose)
    q = map_a * carry_q + map_c
    # P_k = carry_p * prod_{base <= i < k} s_i: a prefix in k is a suffix in the reversed tile.
    previous = tl.load(sorted_ptr + b * N + k - 1, mask=valid & (k > t * BLOCK), other=1.0).to(acc)
    p = tl.cumprod(previous, 0, reverse=True) * carry_p
    slot = tl.load(order_ptr + b * N + k, mask=valid, other=0)
    grad = tl.load(grad_ptr + b * N + slot, mask=valid, other=0.0).to(acc)
    tl.store(grad_usage_ptr + b * N + slot, p * (q - grad), mask=valid)


def allocation_weights_forward(usage: Tensor, block: int = BLOCK) -> Tensor:
    B, N = usage.shape
    sorted_usage, order = torch.sort(usage, dim=-1, stable=True)
    block = min(block, pow2(N))
    T = triton.cdiv(N, block)
    acc = accumulator_dtype(usage.dtype)
    products = torch.empty(B, T, dtype=acc, device=usage.device)
    if T > 1:
        allocation_tile_product_kernel[(B, T)](sorted_usage, products, N, BLOCK=block)
    out = torch.empty(B, N, dtype=acc, device=usage.device)
    allocation_scatter_kernel[(B, T)](sorted_usage, order, products, out, N, T, BLOCK=block, BLOCK_T=pow2(T))
    return out.to(usage.dtype)


def allocation_weights_backward(grads, inputs, outputs, block: int = BLOCK) -> tuple[Tensor]:
    (usage,) = inputs
    grad = grads[0].contiguous()
    B, N = usage.shape
    # the permutation is not saved by the forward: sorting again costs less than keeping [B, N] int64
    sorted_usage, order = torch.sort(usage, dim=-1, stable=True)
    block = min(block, pow2(N))
    T = triton.cdiv(N, block)
    acc = accumulator_dtype(usage.dtype)
    products, maps_a, maps_c = torch.empty(3, B, T, dtype=acc, device=usage.device)
    if T > 1:
        allocation_backward_tile_kernel[(B, T)](sorted_usage, order, grad, products, maps_a, maps_c, N, BLOCK=block)
    grad_usage = torch.empty(B, N, dtype=acc, device=usage.device)
    allocation_backward_kernel[(B, T)](
        sorted_usage, order, grad, products, maps_a, maps_c, grad_usage, N, T, BLOCK=block, BLOCK_T=pow2(T)
    )
    return (grad_usage.to(usage.dtype),)
