"""FaissIndex: buffer merges, tombstones and rebuilds, recall against ExactIndex, threads, missing faiss."""

import sys

import numpy as np
import pytest
import torch

from sparsemem.index import ExactIndex, make_index
from sparsemem.index.faiss_index import IMBALANCE_LIMIT, FaissIndex, load_faiss
from sparsemem.index.memories import clustered_words, near_queries, recall
from tests.index.test_index import DenseMirror, check_search

pytest.importorskip("faiss")

W = 7


def overwrite(index, memory, g, writes, batch_size, num_slots):
    """Writes new rows at `writes` distinct random slots per batch row; returns what they held before."""
    ids = torch.stack([torch.randperm(num_slots, generator=g)[:writes] for _ in range(batch_size)])
    old = memory.words.gather(1, ids.unsqueeze(-1).expand(-1, -1, W)).float()
    rows = torch.randn(batch_size, writes, W, generator=g)
    index.update(rows, ids)
    memory.update(rows, ids)
    return old


def test_hnsw_tombstones_are_filtered_then_purged_by_a_rebuild():
    g = torch.Generator().manual_seed(0)
    batch_size, num_slots = 2, 200
    index = FaissIndex(batch_size, num_slots, W, buffer_rows=16, ef_search=256)
    memory = DenseMirror(batch_size=batch_size, num_slots=num_slots)
    rows = torch.randn(batch_size, num_slots, W, generator=g)
    for first in range(0, num_slots, 10):  # step-sized writes go through the buffer
        slots = torch.arange(first, first + 10).expand(batch_size, -1)
        index.update(rows[:, first : first + 10], slots)
        memory.update(rows[:, first : first + 10], slots)
    stats = index.stats()
    assert stats.buffered == 8 * batch_size and stats.merges == 11 * batch_size  # 200 = 1 build + 11 merges of 16 + 8
    assert stats.tombstones == 0
    builds = index.stats().rebuilds
    old_rows = overwrite(index, memory, g, 40, batch_size, num_slots)
    stats = index.stats()
    assert 0 < stats.tombstones <= 40 * batch_size and stats.rebuilds == builds
    # The old content of an overwritten slot is never found, only its new content.
    check_search(index, memory, old_rows[:, :5], 8)
    check_search(index, memory, torch.randn(batch_size, 4, W, generator=g), 8)
    for _ in range(3):  # past 25% tombstones: the graph is rebuilt from live rows
        overwrite(index, memory, g, 40, batch_size, num_slots)
    stats = index.stats()
    assert stats.rebuilds > builds and stats.tombstones < 0.25 * num_slots * batch_size
    assert stats.rows == num_slots * batch_size and stats.build_seconds > 0 and stats.merge_seconds > 0
    check_search(index, memory, torch.randn(batch_size, 4, W, generator=g), 8)


def test_a_bulk_write_goes_to_faiss_at_once():
    g = torch.Generator().manual_seed(10)
    batch_size, num_slots = 2, 200
    index = FaissIndex(batch_size, num_slots, W, buffer_rows=16, ef_search=256)
    memory = DenseMirror(batch_size=batch_size, num_slots=num_slots)
    overwrite(index, memory, g, 5, batch_size, num_slots)
    overwrite(index, memory, g, 150, batch_size, num_slots)  # with the 5 buffered rows, one build
    stats = index.stats()
    assert stats.buffered == 0 and stats.rebuilds == batch_size and stats.merges == 0
    check_search(index, memory, torch.randn(batch_size, 4, W, generator=g), 8)


def test_ivf_removes_overwritten_rows_at_once():
    g = torch.Generator().manual_seed(1)
    batch_size, num_slots = 2, 300
    index = FaissIndex(batch_size, num_slots, W, kind="ivf", buffer_rows=64, nprobe=64)
    memory = DenseMirror(batch_size=batch_size, num_slots=num_slots)
    overwrite(index, memory, g, num_slots, batch_size, num_slots)
    old_rows = overwrite(index, memory, g, 100, batch_size, num_slots)
    assert index.stats().tombstones == 0
    assert sum(ann.ntotal for ann in index._ann) + index.stats().buffered == num_slots * batch_size
    check_search(index, memory, old_rows[:, :5], 8)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_rebuild_merges_the_buffer_and_keeps_results(kind):
    g = torch.Generator().manual_seed(2)
    batch_size, num_slots = 2, 150
    index = FaissIndex(batch_size, num_slots, W, kind=kind, buffer_rows=32, ef_search=256, nprobe=64)
    memory = DenseMirror(batch_size=batch_size, num_slots=num_slots)
    for _ in range(4):
        overwrite(index, memory, g, 50, batch_size, num_slots)
    queries = torch.randn(batch_size, 4, W, generator=g)
    check_search(index, memory, queries, 8)
    index.rebuild()
    stats = index.stats()
    assert stats.buffered == 0 and stats.tombstones == 0
    check_search(index, memory, queries, 8)
    index.reset(torch.tensor([True, False]))
    memory.words[0] = 0
    check_search(index, memory, queries, 8)


@pytest.mark.parametrize("name", ["faiss-hnsw", "faiss-ivf"])
def test_recall_at_8_on_a_realistic_memory(name):
    """Clustered words, keys near stored words; overwrites leave tombstones (HNSW) and buffered rows."""
    batch_size, num_slots, word_size, k = 2, 2**13, 32, 8
    index = make_index(name, batch_size, num_slots, word_size, buffer_rows=2048)
    exact = ExactIndex(batch_size, num_slots, word_size)
    words = clustered_words(batch_size, num_slots, word_size, seed=3)
    ids = torch.arange(num_slots).expand(batch_size, -1)
    for index_ in (index, exact):
        index_.update(words, ids)
    assert recall(index, exact, near_queries(words, 64, seed=4), k) >= 0.95
    rewritten = clustered_words(batch_size, 1500, word_size, seed=5)
    for index_ in (index, exact):
        index_.update(rewritten, ids[:, :1500])
    stats = index.stats()
    # The rewritten rows wait in the exact buffer; HNSW keeps their old entries as tombstones.
    assert stats.buffered == 1500 * batch_size
    assert stats.tombstones == (1500 * batch_size if name == "faiss-hnsw" else 0)
    memory = torch.cat([rewritten, words[:, 1500:]], 1)
    assert recall(index, exact, near_queries(memory, 64, seed=6), k) >= 0.95


def test_deterministic_builds_give_identical_results():
    words = clustered_words(1, 3000, 16, seed=7)
    queries = near_queries(words, 16, seed=8)
    results = []
    for _ in range(2):
        index = FaissIndex(1, 3000, 16, buffer_rows=1000, ef_search=16, deterministic=True)
        index.update(words, torch.arange(3000).unsqueeze(0))
        results.append(index.search(queries, 8))
    assert torch.equal(results[0][1], results[1][1])


def test_threads_follow_sparsemem_threads(monkeypatch):
    faiss = load_faiss()
    before = faiss.omp_get_max_threads()
    monkeypatch.setenv("SPARSEMEM_THREADS", "1")
    try:
        assert load_faiss().omp_get_max_threads() == 1
    finally:
        faiss.omp_set_num_threads(before)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_searches_run_on_one_thread_and_restore_the_setting(kind, monkeypatch):
    faiss = load_faiss()
    before = faiss.omp_get_max_threads()
    index = FaissIndex(2, 300, W, kind=kind, buffer_rows=16)
    index.update(torch.randn(2, 300, W), torch.arange(300).expand(2, -1))
    seen = []
    search_ann = index._search_ann
    monkeypatch.setattr(index, "_search_ann", lambda *a: seen.append(faiss.omp_get_max_threads()) or search_ann(*a))
    faiss.omp_set_num_threads(2)
    try:
        index.search(torch.randn(2, 3, W), 4)
        assert seen == [1, 1] and faiss.omp_get_max_threads() == 2
    finally:
        faiss.omp_set_num_threads(before)


def test_missing_faiss_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        make_index("faiss-hnsw", 1, 8, 4)


def test_bad_options_errors():
    with pytest.raises(ValueError, match="kind must be"):
        FaissIndex(1, 8, 4, kind="pq")
    with pytest.raises(ValueError, match="rebuild_fraction"):
        FaissIndex(1, 8, 4, rebuild_fraction=0)
    with pytest.raises(ValueError, match="buffer_rows"):
        FaissIndex(1, 8, 4, buffer_rows=0)


def test_brute_force_fallback_when_the_search_reaches_too_few_rows(monkeypatch):
    """IVF lists of ~39 rows, one probed, K = 64, widening disabled: the fallback still finds K."""
    g = torch.Generator().manual_seed(9)
    batch_size, num_slots = 1, 4096
    index = FaissIndex(batch_size, num_slots, W, kind="ivf", buffer_rows=num_slots, nprobe=1)
    memory = DenseMirror(batch_size=batch_size, num_slots=num_slots)
    overwrite(index, memory, g, num_slots, batch_size, num_slots)
    monkeypatch.setattr(index, "_effort_limit", lambda b: 1)
    check_search(index, memory, torch.randn(batch_size, 3, W, generator=g), 64)


def current_scores(memory, queries, ids):
    """The eps-cosine of each query with what the memory holds now at ids."""
    from sparsemem.reference.dnc import cosine_similarity_ref

    return cosine_similarity_ref(memory.words, queries.double()).gather(-1, ids)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_load_builds_once_and_finds_every_row(kind):
    """A bulk load: one build per batch row (IVF trained once, on a pooled sample), no buffer or merges,
    every loaded row its own nearest neighbour, recall@8 as high as rows added by update."""
    batch_size, num_slots, word_size, k = 2, 2**12, 16, 8
    words = clustered_words(batch_size, num_slots, word_size, clusters=64, seed=11)
    loaded = FaissIndex(batch_size, num_slots, word_size, kind=kind, buffer_rows=256)
    loaded.load(words)
    stats = loaded.stats()
    assert stats.rows == batch_size * num_slots and stats.buffered == 0 and stats.merges == 0
    assert stats.rebuilds == batch_size and stats.build_seconds > 0
    assert all(ann.ntotal == num_slots for ann in loaded._ann)
    if kind == "ivf":
        assert all(ann.nlist == num_slots // 39 for ann in loaded._ann)
    _, top = loaded.search(words, 1)
    found = (top[..., 0] == torch.arange(num_slots)).float().mean().item()
    # IVF probes a row's own list first: every row is found; HNSW misses a few
    assert found == 1.0 if kind == "ivf" else found >= 0.99
    exact = ExactIndex(batch_size, num_slots, word_size)
    exact.load(words)
    queries = near_queries(words, 64, seed=12)
    updated = FaissIndex(batch_size, num_slots, word_size, kind=kind, buffer_rows=256)
    updated.update(words, torch.arange(num_slots).expand(batch_size, -1))
    assert recall(loaded, exact, queries, k) >= max(0.95, recall(updated, exact, queries, k) - 0.02)


def imbalance(ann) -> float:
    """nlist * sum(length^2) / rows^2 of an IVF index's lists: 1 when they are all as long."""
    lengths = np.array([ann.invlists.list_size(number) for number in range(ann.nlist)], dtype=np.float64)
    return ann.nlist * np.square(lengths).sum() / lengths.sum() ** 2


def test_a_load_trains_lists_for_a_batch_row_only_when_its_words_are_unlike_the_others():
    """Batch rows of like words share the centroids trained once on a pooled sample. Rows around
    clusters of their own would each fill about half of pooled lists (an imbalance near 2: twice the
    rows scanned per list probed): each gets lists of its own, as even as its own k-means makes them."""
    batch_size, num_slots, word_size, k = 2, 2**12, 16, 8
    like = clustered_words(1, batch_size * num_slots, word_size, clusters=64, seed=11)
    unlike = clustered_words(batch_size, num_slots, word_size, clusters=64, seed=11)
    for words, shared in ((like.view(batch_size, num_slots, word_size), True), (unlike, False)):
        index = FaissIndex(batch_size, num_slots, word_size, kind="ivf")
        index.load(words)
        centroids = [ann.quantizer.reconstruct_n(0, ann.nlist) for ann in index._ann]
        assert bool((centroids[0] == centroids[1]).all()) == shared
        assert all(imbalance(ann) < IMBALANCE_LIMIT for ann in index._ann)
        exact = ExactIndex(batch_size, num_slots, word_size)
        exact.load(words)
        assert recall(index, exact, near_queries(words, 64, seed=12), k) >= 0.95


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_writes_after_a_load_are_found_and_stale_rows_never_returned(kind):
    g = torch.Generator().manual_seed(13)
    batch_size, num_slots, buffer_rows = 2, 2000, 64
    index = FaissIndex(batch_size, num_slots, W, kind=kind, buffer_rows=buffer_rows, ef_search=256, nprobe=64)
    memory = DenseMirror(batch_size=batch_size, num_slots=num_slots)
    rows = torch.randn(batch_size, num_slots, W, generator=g)
    index.load(rows)
    memory.update(rows, torch.arange(num_slots).expand(batch_size, -1))
    # 30 rows wait in the buffer; 100 at once go straight into faiss (a merge), with the 30
    for writes, merges in ((30, 0), (100, batch_size)):
        old = overwrite(index, memory, g, writes, batch_size, num_slots)
        stats = index.stats()
        assert stats.merges == merges and stats.rebuilds == batch_size  # no retraining after a load
        assert stats.rows == batch_size * num_slots
        scores, ids = index.search(old, 8)
        # whatever comes back scores what its slot holds now
        torch.testing.assert_close(scores.double(), current_scores(memory, old, ids), atol=1e-5, rtol=0)
        assert all(row.unique().numel() == 8 for row in ids.flatten(0, 1))
    fresh = torch.randn(batch_size, 5, W, generator=g)
    slots = torch.tensor([[3, 500, 999, 1500, 1999]] * batch_size)
    index.update(fresh, slots)
    memory.update(fresh, slots)
    _, top = index.search(fresh, 1)
    assert torch.equal(top[..., 0], slots)
    if kind == "hnsw":
        assert index.stats().tombstones > 0
    else:
        assert sum(ann.ntotal for ann in index._ann) + index.stats().buffered == batch_size * num_slots
    check_search(index, memory, torch.randn(batch_size, 4, W, generator=g), 8)


def test_deterministic_loads_give_identical_results():
    words = clustered_words(2, 3000, 16, seed=14)
    queries = near_queries(words, 16, seed=15)
    results = []
    for _ in range(2):
        index = FaissIndex(2, 3000, 16, kind="ivf", nprobe=2, deterministic=True)
        index.load(words)
        results.append(index.search(queries, 8))
    assert torch.equal(results[0][1], results[1][1])
