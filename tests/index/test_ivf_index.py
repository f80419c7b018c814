"""TorchIVFIndex: buffer merges, tombstones and rebuilds, probe widening, recall against ExactIndex, CUDA."""

import pytest
import torch

import sparsemem as sm
from sparsemem.index import ExactIndex, TorchIVFIndex
from sparsemem.index.ivf import default_nlist, default_nprobe
from sparsemem.index.memories import clustered_words, near_queries, recall
from tests.index.test_index import DenseMirror, check_search
from tests.tolerances import tolerance

W = 7


def overwrite(index, memory, g, writes, batch_size, num_slots):
    """Writes new rows at `writes` distinct random slots per batch row; returns what they held before."""
    ids = torch.stack([torch.randperm(num_slots, generator=g)[:writes] for _ in range(batch_size)])
    old = memory.words.gather(1, ids.unsqueeze(-1).expand(-1, -1, W)).float()
    rows = torch.randn(batch_size, writes, W, generator=g)
    index.update(rows, ids)
    memory.update(rows, ids)
    return old


def test_buffer_merges_then_tombstones_then_rebuilds():
    g = torch.Generator().manual_seed(0)
    batch_size, num_slots = 2, 400
    index = TorchIVFIndex(batch_size, num_slots, W, buffer_rows=32, nprobe=1024)
    memory = DenseMirror(batch_size=batch_size, num_slots=num_slots)
    rows = torch.randn(batch_size, num_slots, W, generator=g)
    for first in range(0, num_slots, 16):  # step-sized writes go through the buffer
        slots = torch.arange(first, first + 16).expand(batch_size, -1)
        index.update(rows[:, first : first + 16], slots)
        memory.update(rows[:, first : first + 16], slots)
    stats = index.stats()
    # 400 rows = 12 merges of a full buffer (32 rows) + 16 buffered; of those merges, 3 retrain the lists
    # (at 32, 96 and 224 rows: the rows filed since the last training outnumber it).
    assert stats.buffered == 16 * batch_size and stats.merges == 9 * batch_size
    assert stats.rebuilds == 3 * batch_size and stats.tombstones == 0 and stats.rows == num_slots * batch_size
    old_rows = overwrite(index, memory, g, 20, batch_size, num_slots)
    assert 0 < index.stats().tombstones <= 20 * batch_size
    check_search(index, memory, old_rows[:, :5], 8)  # an overwritten row's old content is never found
    check_search(index, memory, torch.randn(batch_size, 4, W, generator=g), 8)
    for _ in range(6):  # past 25% tombstones: each batch row is retrained on its live rows
        overwrite(index, memory, g, 40, batch_size, num_slots)
    stats = index.stats()
    # without the purges nearly every one of the 260 overwrites per batch row would still be a tombstone
    assert stats.rebuilds > 3 * batch_size and stats.tombstones < 0.6 * 260 * batch_size
    assert stats.rows == num_slots * batch_size and stats.build_seconds > 0 and stats.merge_seconds > 0
    check_search(index, memory, torch.randn(batch_size, 4, W, generator=g), 8)
    index.rebuild()
    stats = index.stats()
    assert stats.buffered == 0 and stats.tombstones == 0
    check_search(index, memory, torch.randn(batch_size, 4, W, generator=g), 8)


def test_a_bulk_write_is_filed_at_once():
    g = torch.Generator().manual_seed(1)
    batch_size, num_slots = 2, 300
    index = TorchIVFIndex(batch_size, num_slots, W, buffer_rows=16, nprobe=1024)
    memory = DenseMirror(batch_size=batch_size, num_slots=num_slots)
    overwrite(index, memory, g, 5, batch_size, num_slots)
    overwrite(index, memory, g, 150, batch_size, num_slots)  # with the 5 buffered rows, one build
    stats = index.stats()
    assert stats.buffered == 0 and stats.rebuilds == batch_size and stats.merges == 0
    check_search(index, memory, torch.randn(batch_size, 4, W, generator=g), 8)


def test_one_probe_widens_until_k_live_rows_are_reachable():
    """nprobe=1 over lists of ~16 rows with many tombstones: K = N still gives N distinct written rows."""
    g = torch.Generator().manual_seed(2)
    batch_size, num_slots = 2, 256
    index = TorchIVFIndex(batch_size, num_slots, W, buffer_rows=64, nprobe=1, nlist=16)
    memory = DenseMirror(batch_size=batch_size, num_slots=num_slots)
    overwrite(index, memory, g, num_slots, batch_size, num_slots)
    overwrite(index, memory, g, 60, batch_size, num_slots)  # tombstones, new rows in the buffer
    assert index.stats().tombstones == 60 * batch_size
    for k in (1, 40, num_slots):
        _, ids = index.search(torch.randn(batch_size, 3, W, generator=g), k)
        assert (ids >= 0).all() and all(row.unique().numel() == k for row in ids.flatten(0, 1))
    check_search(index, memory, torch.randn(batch_size, 3, W, generator=g), num_slots)


def test_reset_retrains_only_the_reset_batch_row():
    g = torch.Generator().manual_seed(3)
    batch_size, num_slots = 3, 200
    index = TorchIVFIndex(batch_size, num_slots, W, buffer_rows=32, nprobe=1024)
    memory = DenseMirror(batch_size=batch_size, num_slots=num_slots)
    overwrite(index, memory, g, 150, batch_size, num_slots)
    builds = index.stats().rebuilds
    index.reset(torch.tensor([False, True, False]))
    memory.words[1] = 0
    check_search(index, memory, torch.randn(batch_size, 4, W, generator=g), 8)
    overwrite(index, memory, g, 40, batch_size, num_slots)  # a merge: batch row 1 is trained anew
    assert index.stats().rebuilds == builds + 1  # counted per batch row
    check_search(index, memory, torch.randn(batch_size, 4, W, generator=g), 8)


def test_recall_at_8_on_a_realistic_memory_with_default_lists():
    """Clustered words, keys near stored words, default nlist and nprobe; then overwrites (tombstones, buffer)."""
    batch_size, num_slots, word_size, k = 2, 2**13, 32, 8
    index = TorchIVFIndex(batch_size, num_slots, word_size, buffer_rows=2048)
    exact = ExactIndex(batch_size, num_slots, word_size)
    words = clustered_words(batch_size, num_slots, word_size, clusters=num_slots // 64, seed=3)
    ids = torch.arange(num_slots).expand(batch_size, -1)
    for index_ in (index, exact):
        index_.update(words, ids)
    assert recall(index, exact, near_queries(words, 64, seed=4), k) >= 0.95
    rewritten = clustered_words(batch_size, 1500, word_size, seed=5)
    for index_ in (index, exact):
        index_.update(rewritten, ids[:, :1500])
    stats = index.stats()
    assert stats.buffered == 1500 * batch_size and stats.tombstones == 1500 * batch_size
    memory = torch.cat([rewritten, words[:, 1500:]], 1)
    assert recall(index, exact, near_queries(memory, 64, seed=6), k) >= 0.95


@pytest.mark.parametrize("model_cls", [sm.SAM, sm.SDNC])
def test_sparse_models_accept_index_ivf(model_cls):
    """index="ivf" in SAM and SDNC reads what index="exact" reads (at 40 slots every row sits in the exact
    buffer; merges and rebuilds are the index tests' part)."""
    x = torch.randn(2, 12, 5, generator=torch.Generator().manual_seed(8))
    outputs = []
    for index in ("exact", "ivf"):
        torch.manual_seed(0)
        model = model_cls(5, 12, num_slots=40, word_size=4, num_reads=2, k=3, output_size=6, index=index)
        y, state = model(x)
        outputs.append(y)
    assert isinstance(state.memory.store.index, TorchIVFIndex) and state.memory.store.index.stats().rows > 0
    torch.testing.assert_close(outputs[1], outputs[0])


def test_defaults_follow_the_row_count():
    assert default_nlist(10) == 1 and default_nlist(2**12) == 128 and default_nlist(2**20) == 2048
    assert default_nprobe(1) == 8 and default_nprobe(2048) == 64


def test_bad_options_errors():
    with pytest.raises(ValueError, match="nprobe"):
        TorchIVFIndex(1, 8, 4, nprobe=0)
    with pytest.raises(ValueError, match="rebuild_fraction"):
        TorchIVFIndex(1, 8, 4, rebuild_fraction=0)
    with pytest.raises(ValueError, match="dtype"):
        TorchIVFIndex(1, 8, 4, dtype=torch.int32)


@pytest.mark.gpu
def test_ivf_on_cuda_matches_cpu_and_searches_without_host_syncs():
    g = torch.Generator().manual_seed(7)
    batch_size, num_slots = 3, 500
    indexes = [TorchIVFIndex(batch_size, num_slots, W, device=d, buffer_rows=64, nprobe=1024) for d in ("cpu", "cuda")]
    ids = torch.stack([torch.randperm(num_slots, generator=g) for _ in range(batch_size)])
    rows = torch.randn(batch_size, num_slots, W, generator=g)
    for index in indexes:
        index.update(rows.to(index.device), ids.to(index.device))
        index.update(rows[:, :20].to(index.device) + 1, ids[:, :20].to(index.device))  # tombstones + buffer
    queries = torch.randn(batch_size, 4, W, generator=g)
    (cpu_scores, cpu_ids), (gpu_scores, gpu_ids) = (ix.search(queries.to(ix.device), 8) for ix in indexes)
    assert gpu_ids.device.type == "cuda"
    torch.testing.assert_close(gpu_scores.cpu(), cpu_scores, **tolerance(torch.float32))
    assert torch.equal(gpu_ids.sort(-1).values.cpu(), cpu_ids.sort(-1).values)
    torch.cuda.set_sync_debug_mode("error")
    try:
        indexes[1].search(queries.cuda(), 8)  # every slot written: no unwritten-slot merge either
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_probe_plan_follows_nprobe_set_between_searches():
    # what bench/bench_index.py sweeps: nprobe changed on a built index, the plan of the next search
    words = clustered_words(1, 1024, W, seed=3)
    index = TorchIVFIndex(1, 1024, W, nlist=32, nprobe=2)
    index.update(words, torch.arange(1024).expand(1, -1))
    few_probes, few_candidates = index.probe_plan(8)
    assert 2 <= few_probes < 32 and few_candidates < 1024
    index.nprobe = 32
    assert index.probe_plan(8) == (32, 1024)  # every list probed: every row a candidate
