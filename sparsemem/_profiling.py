"""Named regions of a step for torch.profiler (bench/bench_breakdown.py's breakdown).

region(name) is a torch.profiler.record_function while a profiler runs and a no-op
otherwise: record_function enters a dispatcher op even with no profiler (~10x the cost
of this check), and regions sit on the per-step path of every model.
"""

import contextlib

import torch
from torch.autograd import profiler

PREFIX = "sparsemem."
"""Every region's name starts with this, so a profile's regions are told from torch's own events."""


def region(name: str) -> contextlib.AbstractContextManager:
    """with region("index.search"): ... is recorded as "sparsemem.index.search" when profiling."""
    # Under torch.compile the check itself cannot be traced; compiled code gets no regions.
    if not torch.compiler.is_compiling() and torch.autograd._profiler_enabled():
        return profiler.record_function(PREFIX + name)
    return contextlib.nullcontext()
