"""Index.update_entries and Index.forget on every index: against a dense mirror, and the undo of an
update (restore the overwritten rows, forget the new slots) that the versioned memory relies on."""

import pytest
import torch

from sparsemem import _checks
from sparsemem.index import ExactIndex
from tests.index.test_index import INDEXES, build, check_search

B, N, W, R = 3, 37, 7, 4
TORCH_INDEXES = ("exact", "exact-chunked", "ivf")
KINDS = [(name, torch.float32) for name in INDEXES] + [(name, torch.float64) for name in TORCH_INDEXES]
KIND_IDS = [f"{name}-{str(dtype).removeprefix('torch.')}" for name, dtype in KINDS]


def make(name, dtype, **options):
    return build(name, B, N, W, **({"dtype": dtype} if dtype == torch.float64 else {}), **options)


class Mirror:
    """What the index stands for: rows as written (in their dtype), which slots are written, the initial word."""

    def __init__(self, initial, dtype=torch.float32):
        self.initial = initial.to(dtype)
        self.rows = self.initial.expand(B, N, W).clone()
        self.written = torch.zeros(B, N, dtype=torch.bool)

    @property
    def words(self):  # for check_search
        return self.rows.double()

    def write(self, batch, slots, rows):
        for b, s, row in zip(batch.tolist(), slots.tolist(), rows, strict=True):  # in order: the last row wins
            self.rows[b, s], self.written[b, s] = row, True

    def forget(self, batch, slots):
        self.rows[batch, slots], self.written[batch, slots] = self.initial, False

    def unwritten(self, count):
        free = [(~row).nonzero().flatten()[:count] for row in self.written]
        return torch.stack([torch.cat([ids, torch.full((count - ids.numel(),), -1)]) for ids in free])


def random_entries(g, count, dtype=torch.float32):
    batch, slots = torch.randint(0, B, (count,), generator=g), torch.randint(0, N, (count,), generator=g)
    return batch, slots, torch.randn(count, W, generator=g, dtype=dtype)


def check(index, mirror, g, ks=(1, 8, N)):
    assert index.stats().rows == int(mirror.written.sum())
    assert torch.equal(index.unwritten(N), mirror.unwritten(N))
    for k in ks:
        check_search(index, mirror, torch.randn(B, R, W, generator=g), k)


@pytest.mark.parametrize("name, dtype", KINDS, ids=KIND_IDS)
def test_update_entries_writes_any_entries_and_the_last_of_a_repeat_wins(name, dtype):
    g = torch.Generator().manual_seed(0)
    initial = torch.randn(W, generator=g)
    index, mirror = make(name, dtype, initial=initial), Mirror(initial, dtype)
    for count in (5, 1, 17, 40):
        entries = random_entries(g, count, dtype)
        entries[0][-1], entries[1][-1] = entries[0][0], entries[1][0]  # a repeated pair (when count > 1)
        index.update_entries(*entries)
        mirror.write(*entries)
        check(index, mirror, g)
    index.update_entries(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), torch.zeros(0, W))
    check(index, mirror, g)


@pytest.mark.parametrize("name", [name for name in INDEXES if name.startswith("exact")])
def test_update_entries_of_a_rectangle_is_update(name):
    g = torch.Generator().manual_seed(1)
    by_rows, by_entries = build(name, B, N, W), build(name, B, N, W)
    for _ in range(4):
        rows, ids = torch.randn(B, 9, W, generator=g), torch.randint(0, N, (B, 9), generator=g)
        by_rows.update(rows, ids)
        by_entries.update_entries(torch.arange(B).repeat_interleave(9), ids.flatten(), rows.flatten(0, 1))
        queries = torch.randn(B, R, W, generator=g)
        for got, want in zip(by_entries.search(queries, N), by_rows.search(queries, N), strict=True):
            assert torch.equal(got, want)


@pytest.mark.parametrize("name, dtype", KINDS, ids=KIND_IDS)
def test_forget_unwrites_written_slots_and_ignores_unwritten_ones(name, dtype):
    g = torch.Generator().manual_seed(2)
    initial = torch.randn(W, generator=g)
    index, mirror = make(name, dtype, initial=initial), Mirror(initial, dtype)
    for round, writes in enumerate((30, 5, 12, 4)):
        entries = random_entries(g, writes, dtype)  # through the buffer, merges into the structure, or held
        index.update_entries(*entries)
        mirror.write(*entries)
        # forget some written slots (indexed and buffered ones), some unwritten ones, one twice
        batch, slots, _ = random_entries(g, 12 + 4 * round)
        batch, slots = torch.cat([batch, batch[:1]]), torch.cat([slots, slots[:1]])
        rebuilds = index.stats().rebuilds
        index.forget(batch, slots)
        mirror.forget(batch, slots)
        assert index.stats().rebuilds == rebuilds
        check(index, mirror, g)
    index.forget(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
    everything = mirror.written.nonzero()
    index.forget(everything[:, 0], everything[:, 1])
    mirror.forget(everything[:, 0], everything[:, 1])
    check(index, mirror, g)
    assert index.stats().buffered == 0
    entries = random_entries(g, 25, dtype)  # and written again
    index.update_entries(*entries)
    mirror.write(*entries)
    check(index, mirror, g)


@pytest.mark.parametrize("name", ["ivf", "faiss-hnsw", "faiss-ivf"])
def test_forgotten_indexed_rows_leave_the_structure_without_a_rebuild(name):
    g = torch.Generator().manual_seed(3)
    initial = torch.randn(W, generator=g)
    index, mirror = make(name, torch.float32, initial=initial), Mirror(initial)
    rows = torch.randn(B, 32, W, generator=g)
    index.update(rows, torch.arange(32).expand(B, -1))
    mirror.rows[:, :32], mirror.written[:, :32] = rows, True
    index.rebuild()
    stats = index.stats()
    assert stats.buffered == 0 and stats.tombstones == 0
    batch, slots = torch.arange(B).repeat_interleave(20), torch.arange(20).repeat(B)  # 62% of every batch row
    index.forget(batch, slots)
    mirror.forget(batch, slots)
    after = index.stats()
    assert after.rebuilds == stats.rebuilds and after.merges == stats.merges
    assert after.tombstones == (0 if name == "faiss-ivf" else B * 20)  # faiss IVF removes them at once
    check(index, mirror, g)


def snapshot(index, queries):
    """Everything a caller can observe: search results (with ties) for every K, stats and unwritten slots."""
    found = [index.search(queries, k) for k in (1, 5, N)]
    stats = index.stats()
    return found, (stats.rows, stats.buffered, stats.tombstones, stats.rebuilds, stats.bytes), index.unwritten(N)


def assert_same(got, want):
    (found, stats, unwritten), (want_found, want_stats, want_unwritten) = got, want
    assert stats == want_stats and torch.equal(unwritten, want_unwritten)
    for (scores, ids), (want_scores, want_ids) in zip(found, want_found, strict=True):
        assert torch.equal(scores, want_scores) and torch.equal(ids, want_ids)


def do_and_undo(index, mirror, g, writes, dtype):
    """An update of `writes` slots per batch row (overwrites, new slots, a repeat), then its undo:
    update_entries(the overwritten slots' old rows), forget(the new slots)."""
    ids = torch.randint(0, N, (B, writes), generator=g)
    ids[:, -1] = ids[:, 0]
    rows = torch.randn(B, writes, W, generator=g, dtype=dtype)
    batch, slots = torch.arange(B).repeat_interleave(writes), ids.flatten()
    old_written, old_rows = mirror.written[batch, slots], mirror.rows[batch, slots]
    index.update(rows, ids)
    mirror.write(batch, slots, rows.flatten(0, 1))
    yield
    index.update_entries(batch[old_written], slots[old_written], old_rows[old_written])
    index.forget(batch[~old_written], slots[~old_written])
    mirror.write(batch[old_written], slots[old_written], old_rows[old_written])
    mirror.forget(batch[~old_written], slots[~old_written])


def tied_memory(index, mirror, g, dtype):
    """30 written slots, some holding the same word (ties), in slot-disordered writes."""
    words = torch.randn(B, 6, W, generator=g, dtype=dtype)
    for _ in range(5):
        ids = torch.stack([torch.randperm(N, generator=g)[:6] for _ in range(B)])
        index.update(words, ids)
        mirror.write(torch.arange(B).repeat_interleave(6), ids.flatten(), words.flatten(0, 1))
    return torch.cat([words[:, :2], mirror.initial.expand(B, 1, W), torch.randn(B, 2, W, generator=g, dtype=dtype)], 1)


@pytest.mark.parametrize("path", ["host", "device"])
@pytest.mark.parametrize("name", [name for name in INDEXES if name.startswith("exact")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_undo_restores_the_index_bit_for_bit(name, dtype, path, monkeypatch):
    """Undoing updates in reverse order leaves every search (ties in the same order), stats and unwritten
    slots as before each update; on the host, the compact store itself (row order) too."""
    if path == "device":
        monkeypatch.setattr(_checks, "on_host", lambda device: False)
    g = torch.Generator().manual_seed(4)
    initial = torch.randn(W, generator=g)
    index, mirror = make(name, dtype, initial=initial), Mirror(initial, dtype)
    assert index.on_host == (path == "host")
    queries = tied_memory(index, mirror, g, dtype)

    def state():
        store = [(index._store[b, :rows].clone(), index._ids[b, :rows].clone()) for b, rows in enumerate(index._rows)]
        return snapshot(index, queries), index._slot.clone(), store, list(index._rows)

    def assert_state(got, want):
        assert_same(got[0], want[0])
        assert torch.equal(got[1], want[1]) and got[3] == want[3]
        if path == "host":
            for (store, ids), (want_store, want_ids) in zip(got[2], want[2], strict=True):
                assert torch.equal(store, want_store) and torch.equal(ids, want_ids)

    for writes in (1, 5, 12):
        before = state()
        outer = do_and_undo(index, mirror, g, writes, dtype)
        next(outer)
        middle = state()
        inner = do_and_undo(index, mirror, g, 4, dtype)
        next(inner)
        next(inner, None)
        assert_state(state(), middle)
        next(outer, None)
        assert_state(state(), before)
        check(index, mirror, g)


@pytest.mark.parametrize("name, dtype", [kind for kind in KINDS if not kind[0].startswith("exact")], ids=str)
def test_approximate_undo_restores_the_content_without_a_rebuild(name, dtype):
    """After an undo the index holds the old rows (k = N finds every slot with its old score, the forgotten
    slots unwritten again); no rebuild or merge on the way (the buffer holds the undone writes)."""
    g = torch.Generator().manual_seed(5)
    initial = torch.randn(W, generator=g)
    index, mirror = make(name, dtype, initial=initial), Mirror(initial, dtype)
    queries = tied_memory(index, mirror, g, dtype)
    index.rebuild()  # every written row in the structure, none buffered
    entries = random_entries(g, 3, dtype)  # a few buffered rows
    index.update_entries(*entries)
    mirror.write(*entries)
    before_stats = index.stats()
    before_scores, before_ids = index.search(queries, N)
    writes = do_and_undo(index, mirror, g, 3, dtype)  # at most 3 + 2 buffered rows per batch row, of 8
    next(writes)
    next(writes, None)
    stats = index.stats()
    assert stats.rows == before_stats.rows and stats.rebuilds == before_stats.rebuilds
    assert stats.merges == before_stats.merges
    assert torch.equal(index.unwritten(N), mirror.unwritten(N))
    scores, ids = index.search(queries, N)
    for found in (ids, before_ids):
        assert all(row.unique().numel() == N for row in found.flatten(0, 1))
    # the same (slot, score) pairs: scored by slot, compared in slot order
    by_slot = torch.zeros_like(scores).scatter_(-1, ids, scores)
    before_by_slot = torch.zeros_like(before_scores).scatter_(-1, before_ids, before_scores)
    torch.testing.assert_close(by_slot, before_by_slot, rtol=1e-6, atol=1e-6)
    check(index, mirror, g)


def test_exact_forget_fills_holes_from_the_last_rows():
    index = ExactIndex(1, 10, W)
    words = torch.randn(1, 6, W, generator=torch.Generator().manual_seed(6))
    index.update(words, torch.tensor([[4, 0, 7, 2, 9, 5]]))  # stored in slot order: 0 2 4 5 7 9
    index.forget(torch.tensor([0, 0]), torch.tensor([2, 9]))  # a hole at row 1, and the last row
    assert index._rows == [4] and index._ids[0, :4].tolist() == [0, 7, 4, 5]
    assert index._slot[0].tolist() == [0, -1, -1, -1, 2, 3, -1, 1, -1, -1]
    assert torch.equal(index._store[0, :4], words[0, [1, 2, 0, 5]])
    assert index.unwritten(3).tolist() == [[1, 2, 3]]


def entries_call(method, batch=None, slots=None, rows=None):
    batch = torch.zeros(2, dtype=torch.int64) if batch is None else batch
    slots = torch.zeros(2, dtype=torch.int64) if slots is None else slots
    if method == "forget":
        return lambda ix: ix.forget(batch, slots)
    rows = torch.randn(2, W) if rows is None else rows
    return lambda ix: ix.update_entries(batch, slots, rows)


BAD_ENTRIES = [
    (dict(batch=torch.zeros(3, dtype=torch.int64)), "slots must be \\[M\\] with M=3"),
    (dict(slots=torch.zeros(2, 1, dtype=torch.int64)), "slots must be \\[M\\]"),
    (dict(batch=torch.zeros(2, dtype=torch.int32)), "batch must be int64"),
    (dict(slots=torch.zeros(2)), "slots must be int64"),
    (dict(batch=torch.tensor([0, B])), "batch must lie in \\[0, 2\\]"),
    (dict(batch=torch.tensor([-1, 0])), "batch must lie in"),
    (dict(slots=torch.tensor([0, N])), "slots must hold slot ids in \\[0, N=37\\)"),
    (dict(batch=[0, 1]), "batch must be a tensor"),
    (dict(slots=torch.zeros(2, dtype=torch.int64, device="meta")), "slots is on meta but batch is on cpu"),
]
BAD_ROWS = [
    (dict(rows=torch.randn(3, W)), "rows must be \\[M, W\\] with M=2"),
    (dict(rows=torch.randn(2, W + 1)), "rows must be \\[M, W\\] with W=7"),
    (dict(rows=torch.ones(2, W, dtype=torch.int64)), "floating-point"),
    (dict(rows=torch.full((2, W), float("nan"))), "NaN"),
]


@pytest.mark.parametrize(
    "call, message",
    [
        (entries_call(method, **args), message)
        for method in ("forget", "update_entries")
        for args, message in BAD_ENTRIES
    ]
    + [(entries_call("update_entries", **args), message) for args, message in BAD_ROWS],
)
@pytest.mark.parametrize("name", INDEXES)
def test_bad_entries_errors(name, call, message):
    index = build(name, B, N, W)
    with pytest.raises(ValueError, match=message):
        call(index)
    assert index.stats().rows == 0
