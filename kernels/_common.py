"""What the Triton kernels share: accumulator dtypes, block sizes and how many programs to launch."""

import functools

import torch
import triton
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
    programs = max(1, min(num_tiles, triton.cdiv(target, rows)))
    tiles_per_program = triton.cdiv(num_tiles, programs)
    return triton.cdiv(num_tiles, tiles_per_program), tiles_per_program
