"""What the Triton kernels share: accumulator dtypes, block sizes, how many programs to launch, tile indexing,
and the gather of K rows per head with its cosine backward (topk_content and sparse_read)."""

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

# Masked loads give float `other` values (other=1.0, never other=1): triton 3.9's interpreter
# turns an integer `other` into 0 for bfloat16 pointers.

EPS = 1e-6  # sparsemem.reference.dnc.EPS: added to squared norms before the square root

TILE_ELEMENTS = 4096
"""Most elements of one [.., BLOCK_N, BLOCK_W] register tile: 32 per thread at 4 warps."""


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other float accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def contiguous(*tensors: Tensor) -> tuple[Tensor, ...]:
    return tuple(t.contiguous() for t in tensors)


def pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def block_n(N: int, *widths: int, cap: int = 256) -> int:
    """Slots per tile so that one [*widths, BLOCK_N] tile stays within TILE_ELEMENTS."""
    per_slot = 1
    for width in widths:
        per_slot *= pow2(width)
    return max(1, min(cap, pow2(N), TILE_ELEMENTS // per_slot))


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def splits(num_tiles: int, rows: int, device: torch.device) -> tuple[int, int]:
    """(programs per row, tiles per program) so that rows * programs fills the GPU about 4 times.

    On the CPU (the interpreter) a row is split in at most 4, which still exercises the merge.
    """
    target = 4 * _multiprocessors(device.index or 0) if device.type == "cuda" else 4
    # no rows (B = 0) or no tiles (N = 0) count as one: no division by zero, and a grid over
    # `rows` launches nothing
    rows, num_tiles = max(rows, 1), max(num_tiles, 1)
    programs = max(1, min(num_tiles, triton.cdiv(target, rows)))
    tiles_per_program = triton.cdiv(num_tiles, programs)
    return triton.cdiv(num_tiles, tiles_per_program), tiles_per_program


def split_n(N: int, rows: int, device: torch.device, *widths: int) -> tuple[int, int, int]:
    """(BLOCK_N, programs per row, tiles per program) of a kernel that splits each of `rows` rows'
    N slots among programs, a [*widths, BLOCK_N] tile at a time (the kernel side: split_slots)."""
    BLOCK_N = block_n(N, *widths)
    return BLOCK_N, *splits(triton.cdiv(N, BLOCK_N), rows, device)


# --- how the kernels index their tiles, inlined where called


@triton.jit
def split_slots(split, tile, tiles_per_program, BLOCK_N: tl.constexpr):
    """The slots [BLOCK_N] of a split's tile-th tile: split s walks slots [s * tiles_per_program * BLOCK_N, ...)."""
    return split * tiles_per_program * BLOCK_N + tile * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def tile_at(b, rows, M, columns, C):
    """Offsets and mask of the [len(rows), len(columns)] tile of batch row b of a row-major
    [B, M, C] tensor; the mask is False past M and C."""
    return (b * M + rows[:, None]) * C + columns[None, :], (rows < M)[:, None] & (columns < C)[None, :]


# --- what the cosine kernels (content, sparse, memory_rw) share, inlined where they are called


@triton.jit
def load_rows(ptr, first, rows, rows_ok, W, w, w_ok, acc: tl.constexpr):
    """Rows `first + rows` of a row-major [.., W] tensor as a [ROWS, BLOCK_W] tile in acc, 0 where
    rows_ok or w_ok is False (rows: a range of slots, or gathered slot ids)."""
    tile = tl.load(ptr + (first + rows[:, None]) * W + w[None, :], mask=rows_ok[:, None] & w_ok[None, :], other=0.0)
    return tile.to(acc)


@triton.jit
def norms(x, EPS: tl.constexpr):
    """||x_i|| of each row of x [ROWS, BLOCK_W], EPS added to the squared norm (reference.dnc.EPS)."""
    return tl.sqrt(tl.sum(x * x, 1) + EPS)


@triton.jit
def norm(x, EPS: tl.constexpr):
    """||x|| of a vector x [BLOCK_W], EPS added to the squared norm."""
    return tl.sqrt(tl.sum(x * x) + EPS)


@triton.jit
def memory_tile(memory_ptr, b, N, W, n, w, w_ok, keys, EPS: tl.constexpr):
    """Slots n of batch row b's memory [B, N, W] against keys [BLOCK_R, BLOCK_W] (in the accumulator
    dtype): -> (words [BLOCK_N, BLOCK_W], their norms [BLOCK_N], key . word dots [BLOCK_R, BLOCK_N])."""
    words = load_rows(memory_ptr, b * N, n, n < N, W, w, w_ok, keys.dtype)
    return words, norms(words, EPS), tl.sum(keys[:, None, :] * words[None, :, :], 2)


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


def scatter_rows(memory: Tensor, indices: Tensor, grad_rows: Tensor) -> Tensor:
    """The dense [B, N, W] memory gradient from the gradients of the gathered rows [B, R, K, W]."""
    B, N, W = memory.shape
    grad_memory = torch.zeros(B, N, W, dtype=grad_rows.dtype, device=memory.device)
    flat = indices.flatten(1).unsqueeze(-1).expand(-1, -1, W)  # flatten, not reshape(B, -1): B or W may be 0
    return grad_memory.scatter_add_(1, flat, grad_rows.flatten(1, -2)).to(memory.dtype)
