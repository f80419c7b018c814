"""Public ops: validated at the boundary, registered as torch.ops.sparsemem.*, backend-dispatched.

One module per op family (its file stem in every layer: kernels/, csrc/, tests/ops/); the backend
registry (sparsemem._backends, sparsemem.backends_for) lists them all. journaled_write, the sparse
memory's in-place write, and dnc_sequence, sam_sequence and sdnc_sequence, a DNC's, a SAM's and an
SDNC's steps in one call, are registered too but internal: sparsemem.ops.journaled_write,
sparsemem.ops.dnc_sequence, sparsemem.ops.sam_sequence (both sam_sequence and sdnc_sequence).
"""

from sparsemem.ops.allocation import allocation_weights
from sparsemem.ops.content import content_read, content_weights
from sparsemem.ops.dnc import dnc_read, dnc_write
from sparsemem.ops.links import link_update, link_update_reads, temporal_reads
from sparsemem.ops.memory_rw import memory_read, memory_write
from sparsemem.ops.ntm import ntm_address
from sparsemem.ops.sparse_links import sparse_link_update, sparse_temporal_reads
from sparsemem.ops.sparse_read import sparse_read
from sparsemem.ops.sparse_write import sparse_write
from sparsemem.ops.topk_content import topk_content
from sparsemem.ops.usage import usage_update

# isort: split
# the internal ops, registered after the public ones (journaled_write's backward composes
# sparse_write's kernels; dnc_sequence and sam_sequence run a DNC's and a SAM's or SDNC's steps)
from sparsemem.ops import dnc_sequence, journaled_write, sam_sequence  # noqa: F401

__all__ = [
    "allocation_weights",
    "content_read",
    "content_weights",
    "dnc_read",
    "dnc_write",
    "link_update",
    "link_update_reads",
    "memory_read",
    "memory_write",
    "ntm_address",
    "sparse_link_update",
    "sparse_read",
    "sparse_temporal_reads",
    "sparse_write",
    "temporal_reads",
    "topk_content",
    "usage_update",
]
