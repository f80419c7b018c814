"""keep_freed_memory(): glibc's malloc serves large allocations from fresh mmap'd pages (every
one above 32 MiB, always), and the kernel zeroes each page on first touch. A dense DNC at
N = 2^10 (B = 8) allocates several 32 MiB link matrices a step, forward and backward, so about a
fifth of its CPU time went to page faults (70,000 a 16-step sequence, 0.2 s of system time
against 0.6 s of user time). Serving them from the heap and keeping what is freed there makes
the next step reuse the same pages: 9 faults a sequence. The price: the process keeps its peak
memory until it exits, which suits a training or evaluation process, not a library's every user,
so the CLIs (train, evaluate) call it and a user's script may.
"""

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to take every allocation from its heap (M_MMAP_MAX = 0) and to give
    back freed memory only above 2 GiB of it (M_TRIM_THRESHOLD). -> whether it applied (False on
    other C libraries and platforms, where nothing changes)."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt, nothing to tune
        return False
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
