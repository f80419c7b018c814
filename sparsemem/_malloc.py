"""keep_freed_memory(): glibc's malloc serves large allocations from fresh mmap'd pages (every
one above 32 MiB, always), and the kernel zeroes each page on first touch. A dense DNC at
N = 2^10 (B = 8) allocates several 32 MiB link matrices a step, forward and backward, so about a
fifth of its CPU time went to page faults (70,000 a 16-step sequence, 0.2 s of system time
against 0.6 s of user time). Serving them from the heap and keeping what is freed there makes
the next step reuse the same pages: 9 faults a sequence. The price: the process keeps its peak
memory until it exits, which suits a training or evaluation process, not a library's every user,
so the CLIs (train, evaluate) call it and a user's script may.

huge_pages(tensor): a sparse memory's large stores (rows, link rows, LRU stamps: gigabytes at a
million slots) are read and written a few rows at a time at scattered places, so on 4 KiB pages
nearly every row costs a TLB miss and a page walk. Where transparent huge pages are left to
madvise (most distributions' default), the stores ask for 2 MiB pages: SDNC's and SAM's steps at
2^20 slots (B = 8, faiss-ivf) took 3-14% less time (forward+backward, alternated runs on 2
cores). A row touched then commits the 2 MiB around it, not 4 KiB: a fresh memory writes its slots
from the lowest up (the LRU order), so that adds at most a few MiB per batch row.
"""

import ctypes
import ctypes.util
import functools
import sys

from torch import Tensor

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
MADV_HUGEPAGE = 14
HUGE_PAGE = 2 << 20
"""x86-64's and arm64's (4 KiB base pages) transparent huge page."""


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    if hasattr(libc, "madvise"):
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to take every allocation from its heap (M_MMAP_MAX = 0) and to give
    back freed memory only above 2 GiB of it (M_TRIM_THRESHOLD). -> whether it applied (False on
    other C libraries and platforms, where nothing changes)."""
    mallopt = getattr(_libc(), "mallopt", None)  # musl and others: no mallopt, nothing to tune
    if mallopt is None:
        return False
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1


def huge_pages(tensor: Tensor) -> Tensor:
    """Ask for transparent huge pages under the whole 2 MiB pages inside a CPU tensor's memory
    (madvise MADV_HUGEPAGE; call it before the pages are first touched, which is when the kernel
    picks their size). Returns the tensor; anything but a CPU tensor spanning a huge page, or a
    kernel that refuses, is left as it is."""
    madvise = getattr(_libc(), "madvise", None)
    if madvise is None or tensor.device.type != "cpu":
        return tensor
    start = tensor.data_ptr()
    first = -(-start // HUGE_PAGE) * HUGE_PAGE
    end = (start + tensor.numel() * tensor.element_size()) // HUGE_PAGE * HUGE_PAGE
    if end > first:
        madvise(first, end - first, MADV_HUGEPAGE)  # EINVAL without THP support: 4 KiB pages, as before
    return tensor
