"""Pure-PyTorch dense references: the specification of every op."""

from sparsemem.reference.dnc import (
    allocation_weights_ref,
    content_read_ref,
    content_weights_ref,
    cosine_similarity_ref,
    dnc_read_ref,
    dnc_sequence_ref,
    dnc_write_ref,
    link_update_reads_ref,
    link_update_ref,
    memory_read_ref,
    memory_write_ref,
    split_interface_ref,
    temporal_reads_ref,
    usage_update_ref,
)
from sparsemem.reference.ntm import ntm_address_ref
from sparsemem.reference.sam import (
    access_update_ref,
    lru_ref,
    sam_step_ref,
    sam_write_ref,
    sam_write_weights_ref,
    topk_read_ref,
)
from sparsemem.reference.sdnc import (
    sdnc_link_update_ref,
    sdnc_step_ref,
    sdnc_temporal_reads_ref,
    sparse_link_update_ref,
    sparse_temporal_reads_ref,
)
from sparsemem.reference.sparse import journaled_write_ref, sparse_read_ref, sparse_write_ref, topk_content_ref

__all__ = [
    "access_update_ref",
    "allocation_weights_ref",
    "content_read_ref",
    "content_weights_ref",
    "cosine_similarity_ref",
    "dnc_read_ref",
    "dnc_sequence_ref",
    "dnc_write_ref",
    "journaled_write_ref",
    "link_update_reads_ref",
    "link_update_ref",
    "lru_ref",
    "memory_read_ref",
    "memory_write_ref",
    "ntm_address_ref",
    "sam_step_ref",
    "sam_write_ref",
    "sam_write_weights_ref",
    "sdnc_link_update_ref",
    "sdnc_step_ref",
    "sdnc_temporal_reads_ref",
    "sparse_link_update_ref",
    "sparse_read_ref",
    "sparse_temporal_reads_ref",
    "sparse_write_ref",
    "split_interface_ref",
    "temporal_reads_ref",
    "topk_content_ref",
    "topk_read_ref",
    "usage_update_ref",
]
