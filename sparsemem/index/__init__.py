"""Nearest-neighbour indexes over lazy memories, behind one interface (see base.Index).

make_index("exact" | "ivf" | "faiss-hnsw" | "faiss-ivf", B, N, W, **options) is what the
sparse memory modules and models use for their `index=` argument.
"""

from sparsemem.index.base import Index, IndexStats
from sparsemem.index.exact import ExactIndex
from sparsemem.index.ivf import TorchIVFIndex

INDEXES = ("exact", "ivf", "faiss-hnsw", "faiss-ivf")


def make_index(name: str, batch_size: int, num_slots: int, word_size: int, **options) -> Index:
    """An index by name: "exact" (ExactIndex), "ivf" (TorchIVFIndex, any device), "faiss-hnsw" or
    "faiss-ivf" (FaissIndex, CPU)."""
    if name == "exact":
        return ExactIndex(batch_size, num_slots, word_size, **options)
    if name == "ivf":
        return TorchIVFIndex(batch_size, num_slots, word_size, **options)
    if name in ("faiss-hnsw", "faiss-ivf"):
        from sparsemem.index.faiss_index import FaissIndex

        return FaissIndex(batch_size, num_slots, word_size, kind=name.removeprefix("faiss-"), **options)
    raise ValueError(f"index must be one of {', '.join(INDEXES)}; got {name!r}")


__all__ = ["INDEXES", "ExactIndex", "Index", "IndexStats", "TorchIVFIndex", "make_index"]
