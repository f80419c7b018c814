"""Public ops: validated at the boundary, registered as torch.ops.sparsemem.*, backend-dispatched."""

from sparsemem.ops.allocation import allocation_weights
from sparsemem.ops.content import content_read, content_weights
from sparsemem.ops.links import link_update, link_update_reads, temporal_reads
from sparsemem.ops.memory_rw import memory_read, memory_write
from sparsemem.ops.ntm import ntm_address
from sparsemem.ops.sparse import sparse_read, sparse_write, topk_content
from sparsemem.ops.sparse_links import sparse_link_update, sparse_temporal_reads
from sparsemem.ops.usage import usage_update

__all__ = [
    "allocation_weights",
    "content_read",
    "content_weights",
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
