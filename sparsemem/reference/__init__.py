"""Pure-PyTorch dense references: the specification of every op."""

from sparsemem.reference.dnc import (
    allocation_weights_ref,
    content_read_ref,
    content_weights_ref,
    cosine_similarity_ref,
    link_update_ref,
    memory_read_ref,
    memory_write_ref,
    temporal_reads_ref,
    usage_update_ref,
)
from sparsemem.reference.ntm import ntm_address_ref
from sparsemem.reference.sparse import sparse_read_ref, sparse_write_ref, topk_content_ref

__all__ = [
    "allocation_weights_ref",
    "content_read_ref",
    "content_weights_ref",
    "cosine_similarity_ref",
    "link_update_ref",
    "memory_read_ref",
    "memory_write_ref",
    "ntm_address_ref",
    "sparse_read_ref",
    "sparse_write_ref",
    "temporal_reads_ref",
    "topk_content_ref",
    "usage_update_ref",
]
