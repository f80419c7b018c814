"""sparsemem: fast, exact external memories (NTM, DNC, SAM, SDNC) for PyTorch."""

from sparsemem import _backends, memory, ops, reference
from sparsemem._backends import backends, backends_for
from sparsemem._malloc import keep_freed_memory
from sparsemem.models import DNC, NTM, SAM, SDNC, MemoryModel, ModelState

__version__ = "0.1.0"

# The compiled kernels register themselves with torch.ops.sparsemem on import;
# a missing extension only makes the cpp/cuda backends unavailable.
_backends.extension()

__all__ = [
    "DNC",
    "NTM",
    "SAM",
    "SDNC",
    "MemoryModel",
    "ModelState",
    "backends",
    "backends_for",
    "keep_freed_memory",
    "memory",
    "ops",
    "reference",
]
