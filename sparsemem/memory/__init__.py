"""Memory access modules: init_state(B, memory=None), step(state, interface) -> (reads, state)."""

from sparsemem.memory.sam import SAMInterface, SAMMemory, SAMState, SparseWeights
from sparsemem.memory.sdnc import SDNCInterface, SDNCMemory, SDNCState, SparseLinks

__all__ = [
    "SAMInterface",
    "SAMMemory",
    "SAMState",
    "SDNCInterface",
    "SDNCMemory",
    "SDNCState",
    "SparseLinks",
    "SparseWeights",
]
