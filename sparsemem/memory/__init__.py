"""Memory access modules: init_state(B, memory=None), step(state, interface) -> (reads, state).

Memory (memory/base.py) is the interface a new memory type implements to plug into
sparsemem.models.MemoryModel.
"""

from sparsemem.memory.base import DenseState, Memory
from sparsemem.memory.dnc import DNCInterface, DNCMemory, DNCState
from sparsemem.memory.ntm import NTMInterface, NTMMemory, NTMState
from sparsemem.memory.sam import SAMInterface, SAMMemory, SAMState, SparseWeights
from sparsemem.memory.sdnc import SDNCInterface, SDNCMemory, SDNCState, SparseLinks

__all__ = [
    "DNCInterface",
    "DNCMemory",
    "DNCState",
    "DenseState",
    "Memory",
    "NTMInterface",
    "NTMMemory",
    "NTMState",
    "SAMInterface",
    "SAMMemory",
    "SAMState",
    "SDNCInterface",
    "SDNCMemory",
    "SDNCState",
    "SparseLinks",
    "SparseWeights",
]
