"""Every index against brute force on a materialised lazy memory: the contract of sparsemem.index.Index."""

import pytest
import torch

from sparsemem.index import ExactIndex, make_index
from sparsemem.reference.dnc import cosine_similarity_ref
from sparsemem.reference.sparse import topk_content_ref
from tests.conftest import cpu_backends
from tests.tolerances import tolerance

# Small sizes, so every index is exact here: faiss searches all of a tiny graph or every list.
B, N, W, R = 3, 61, 7, 3
INDEXES = {
    "exact": {},
    "exact-chunked": {"chunk_rows": 5},
    # batch rows with different row counts searched one by one (the joint search: "exact")
    "exact-per-row": {"joint_spread": 0},
    # every list probed, so exact; a buffer of 8 rows merges, tombstones and rebuilds many times
    "ivf": {"buffer_rows": 8, "nprobe": 1024},
    # a buffer of 8 rows, so these tests merge into faiss and overwrite merged rows many times
    "faiss-hnsw": {"buffer_rows": 8, "ef_search": 128},
    "faiss-ivf": {"buffer_rows": 8, "nprobe": 1024},
}


def build(name: str, batch_size: int = B, num_slots: int = N, word_size: int = W, **options):
    options = {**INDEXES[name], **options}
    return make_index("exact" if name.startswith("exact") else name, batch_size, num_slots, word_size, **options)


class DenseMirror:
    """The dense memory an index stands for: the initial word everywhere, written rows on top."""

    def __init__(self, initial: torch.Tensor | None = None, batch_size: int = B, num_slots: int = N):
        word = torch.zeros(W, dtype=torch.float64) if initial is None else initial.double()
        self.words = word.expand(batch_size, num_slots, W).clone()

    def update(self, rows: torch.Tensor, ids: torch.Tensor) -> None:
        batch = torch.arange(ids.shape[0])
        for j in range(ids.shape[1]):  # in order, so a repeated id keeps its last row
            self.words[batch, ids[:, j]] = rows[:, j].double()


def check_search(index, memory: DenseMirror, queries: torch.Tensor, k: int) -> None:
    """Scores equal the brute-force top-K; ids are distinct and score what the memory holds now."""
    scores, ids = index.search(queries, k)
    assert scores.shape == ids.shape == (queries.shape[0], queries.shape[1], k)
    assert ids.dtype == torch.int64
    expected, _ = topk_content_ref(memory.words, queries.double(), k)
    torch.testing.assert_close(scores.double(), expected, **tolerance(torch.float32))
    assert (ids >= 0).all()
    assert all(row.unique().numel() == k for row in ids.flatten(0, 1))
    similarity = cosine_similarity_ref(memory.words, queries.double())
    torch.testing.assert_close(similarity.gather(-1, ids), scores.double(), **tolerance(torch.float32))


def random_writes(generator: torch.Generator, writes: int, batch_size: int = B, num_slots: int = N):
    ids = torch.randint(0, num_slots, (batch_size, writes), generator=generator)
    return torch.randn(batch_size, writes, W, generator=generator), ids


@pytest.mark.parametrize("name", INDEXES)
@pytest.mark.parametrize("k", [1, 8, N])
def test_matches_brute_force_as_rows_are_written(name, k):
    g = torch.Generator().manual_seed(k)
    index, memory = build(name), DenseMirror()
    check_search(index, memory, torch.randn(B, R, W, generator=g), k)  # a fresh memory: all initial
    for _ in range(12):
        rows, ids = random_writes(g, 9)
        index.update(rows, ids)
        memory.update(rows, ids)
        check_search(index, memory, torch.randn(B, R, W, generator=g), k)
    # Every slot written: no initial word left.
    rows, ids = torch.randn(B, N, W, generator=g), torch.stack([torch.randperm(N, generator=g) for _ in range(B)])
    index.update(rows, ids)
    memory.update(rows, ids)
    assert index.stats().rows == B * N
    check_search(index, memory, torch.randn(B, R, W, generator=g), k)


@pytest.mark.parametrize("name", INDEXES)
def test_update_is_visible_and_overwritten_content_never_returned(name):
    index = build(name)
    word = torch.randn(B, 1, W, generator=torch.Generator().manual_seed(1))
    slot = torch.full((B, 1), 17)
    index.update(word, slot)
    scores, ids = index.search(word, 1)
    assert (ids == 17).all()
    torch.testing.assert_close(scores, torch.ones(B, 1, 1), atol=1e-5, rtol=0)
    index.update(-word, slot)
    scores, ids = index.search(word, 4)
    assert (ids[..., 0] != 17).all()  # the old content is gone: an unwritten slot (score 0) ranks first
    assert (scores[..., 0] == 0).all()
    scores, ids = index.search(-word, 1)
    assert (ids == 17).all()


@pytest.mark.parametrize("name", INDEXES)
def test_load_equals_update_of_every_slot(name):
    """load(rows) leaves what reset() then update(rows, every slot) leaves; later writes behave as after updates."""
    g = torch.Generator().manual_seed(12)
    rows = torch.randn(B, N, W, generator=g)
    every_slot = torch.arange(N).expand(B, -1)
    loaded, updated, memory = build(name), build(name), DenseMirror()
    loaded.update(*random_writes(g, 20))  # forgotten by the load
    loaded.load(rows)
    updated.update(rows, every_slot)
    memory.update(rows, every_slot)
    stats = loaded.stats()
    assert stats.rows == B * N and stats.buffered == 0 and stats.tombstones == 0
    for k in (1, 8, N):
        queries = torch.randn(B, R, W, generator=g)
        check_search(loaded, memory, queries, k)
        if name.startswith("exact"):
            for got, want in zip(loaded.search(queries, k), updated.search(queries, k), strict=True):
                assert torch.equal(got, want)
    # Writes after a load: the new content is found, the old never returned, merges included.
    for writes in (2, 9, 30):
        ids = torch.stack([torch.randperm(N, generator=g)[:writes] for _ in range(B)])
        old = memory.words.gather(1, ids.unsqueeze(-1).expand(-1, -1, W)).float()
        new_rows = torch.randn(B, writes, W, generator=g)
        loaded.update(new_rows, ids)
        memory.update(new_rows, ids)
        check_search(loaded, memory, old[:, :R], 8)
        check_search(loaded, memory, new_rows[:, :R], 8)


@pytest.mark.parametrize("name", INDEXES)
def test_load_checks_its_rows(name):
    index = build(name)
    with pytest.raises(ValueError, match="rows must be"):
        index.load(torch.randn(B, N - 1, W))
    with pytest.raises(ValueError, match="floating-point"):
        index.load(torch.ones(B, N, W, dtype=torch.int64))
    bad = torch.randn(B, N, W)
    bad[1, N - 1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        index.load(bad)


@pytest.mark.parametrize("name", INDEXES)
def test_repeated_id_in_one_update_keeps_the_last_row(name):
    index = build(name)
    rows = torch.randn(B, 3, W, generator=torch.Generator().manual_seed(2))
    index.update(rows, torch.full((B, 3), 5))
    assert index.stats().rows == B
    scores, ids = index.search(rows[:, 2:], 1)
    assert (ids == 5).all()
    torch.testing.assert_close(scores, torch.ones(B, 1, 1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", INDEXES)
@pytest.mark.parametrize("k", [1, 5])
def test_batch_rows_far_apart_in_rows_written(name, k):
    """Batch row 0 writes 40 slots, row 1 three, row 2 none: counts further apart than K, then
    nearer (exact-per-row searches each batch row on its own, exact all in one search over the
    fullest's rows)."""
    g = torch.Generator().manual_seed(4)
    index, memory = build(name), DenseMirror()
    for written in ([40, 3, 0], [43, 41, 40]):
        for b, count in enumerate(written):
            ids = torch.randperm(N, generator=g)[:count].unsqueeze(0)
            rows = torch.randn(1, count, W, generator=g)
            index.update_entries(torch.full((count,), b), ids[0], rows[0])
            memory.words[b, ids[0]] = rows[0].double()
        check_search(index, memory, torch.randn(B, R, W, generator=g), k)


@pytest.mark.parametrize("name", INDEXES)
def test_batch_rows_are_independent(name):
    g = torch.Generator().manual_seed(3)
    index = build(name)
    rows, ids = random_writes(g, 20)
    index.update(rows, ids)
    queries = torch.randn(B, R, W, generator=g)
    before = index.search(queries, 6)
    other = torch.randn(B, 20, W, generator=g)
    other[1:] = rows[1:]  # batch row 0 gets new content, the others are rewritten unchanged
    index.update(other, ids)
    after = index.search(queries, 6)
    for got, was in zip(after, before, strict=True):
        torch.testing.assert_close(got[1:], was[1:])
    memory = DenseMirror()
    memory.update(other, ids)
    check_search(index, memory, queries, 6)


@pytest.mark.parametrize("name", INDEXES)
def test_reset_forgets_only_masked_batch_rows(name):
    g = torch.Generator().manual_seed(4)
    initial = torch.randn(W, generator=g)
    index, memory = build(name, initial=initial), DenseMirror(initial)
    rows, ids = random_writes(g, 30)
    index.update(rows, ids)
    memory.update(rows, ids)
    kept = index.stats().rows
    index.reset(torch.tensor([True, False, True]))
    memory.words[0] = initial
    memory.words[2] = initial
    assert kept == sum(row.unique().numel() for row in ids)
    assert index.stats().rows == ids[1].unique().numel()
    check_search(index, memory, torch.randn(B, R, W, generator=g), 8)
    index.reset()
    assert index.stats().rows == 0
    _, ids = index.search(torch.randn(B, R, W, generator=g), 5)
    assert (ids.sort(-1).values == torch.arange(5)).all()  # the lowest unwritten slots stand for the initial word


@pytest.mark.parametrize("name", INDEXES)
def test_unwritten_slots_are_concrete_lowest_ids(name):
    initial = torch.ones(W)
    index = build(name, initial=initial)
    index.update(torch.randn(B, 3, W, generator=torch.Generator().manual_seed(5)), torch.tensor([[0, 1, 3]] * B))
    scores, ids = index.search(initial.expand(B, 1, W), 4)
    assert ids.sort(-1).values.tolist() == [[[2, 4, 5, 6]]] * B
    torch.testing.assert_close(scores, torch.ones(B, 1, 4), atol=1e-5, rtol=0)
    assert index.unwritten(3).tolist() == [[2, 4, 5]] * B


def test_unwritten_scan_finds_slots_past_a_written_prefix():
    index = ExactIndex(1, 1000, W)
    index.update(torch.randn(1, 900, W), torch.arange(900).unsqueeze(0))
    assert index.unwritten(3).tolist() == [[900, 901, 902]]
    index.update(torch.randn(1, 1, W), torch.tensor([[901]]))
    assert index.unwritten(3).tolist() == [[900, 902, 903]]
    index.update(torch.randn(1, 100, W), torch.arange(900, 1000).unsqueeze(0))
    assert index.unwritten(2).tolist() == [[-1, -1]]


def test_exact_index_float64_equals_reference_to_float64_tolerance():
    g = torch.Generator().manual_seed(6)
    index = ExactIndex(B, N, W, dtype=torch.float64, chunk_rows=7)
    memory = DenseMirror()
    rows, ids = random_writes(g, 40)
    rows = rows.double()
    index.update(rows, ids)
    memory.update(rows, ids)
    queries = torch.randn(B, R, W, generator=g, dtype=torch.float64)
    scores, _ = index.search(queries, 10)
    expected, _ = topk_content_ref(memory.words, queries, 10)
    torch.testing.assert_close(scores, expected, **tolerance(torch.float64))


@pytest.mark.parametrize("backend", cpu_backends("topk_content"))
@pytest.mark.parametrize("chunk_rows", [None, 4])
def test_exact_index_searches_with_every_topk_content_backend(backend, chunk_rows, use_backend):
    """One op in one place: each backend of ops.topk_content gives the brute-force top K, also for
    rows whose squared norm is near the eps of ||x||_eps (where unit rows would rank differently)."""
    use_backend(backend)
    g = torch.Generator().manual_seed(8)
    index, memory = ExactIndex(B, N, W, chunk_rows=chunk_rows), DenseMirror()
    for scale in (1.0, 1e-3):
        rows, ids = random_writes(g, 25)
        rows = rows * scale * torch.rand(B, 25, 1, generator=g)
        index.update(rows, ids)
        memory.update(rows, ids)
        check_search(index, memory, torch.randn(B, R, W, generator=g), 8)


@pytest.mark.parametrize("backend", [b for b in cpu_backends("topk_content") if b != "torch"])
@pytest.mark.parametrize("chunk_rows", [None, 2])
def test_exact_index_equal_scores_keep_the_earlier_row_first(backend, chunk_rows, use_backend):
    """Fused backends order ties by storage row (rows are appended in slot order), across chunks too."""
    use_backend(backend)
    index = ExactIndex(1, 20, W, chunk_rows=chunk_rows)
    word = torch.randn(W, generator=torch.Generator().manual_seed(9))
    index.update(word.expand(1, 6, W), torch.tensor([[11, 3, 7, 15, 5, 9]]))
    _, ids = index.search(word.view(1, 1, W), 4)
    assert ids.tolist() == [[[3, 5, 7, 9]]]


def test_exact_index_keeps_rows_as_written():
    """The full-regime preload is a copy: rows are stored as given (topk_content normalises), in place."""
    rows = torch.randn(2, 50, W, generator=torch.Generator().manual_seed(10))
    index = ExactIndex(2, 50, W)
    for start in range(0, 50, 20):
        index.update(rows[:, start : start + 20], torch.arange(start, min(start + 20, 50)).expand(2, -1))
    assert torch.equal(index._store[:, :50], rows)
    assert index._ids[:, :50].tolist() == [list(range(50))] * 2


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda ix: ix.update(torch.randn(B, 2, W), torch.zeros(B, 3, dtype=torch.int64)), "ids must be"),
        (lambda ix: ix.update(torch.randn(B + 1, 2, W), torch.zeros(B + 1, 2, dtype=torch.int64)), "rows must be"),
        (lambda ix: ix.update(torch.randn(B, 2, W + 1), torch.zeros(B, 2, dtype=torch.int64)), "W=7"),
        (lambda ix: ix.update(torch.randn(B, 2, W), torch.zeros(B, 2, dtype=torch.int32)), "int64"),
        (lambda ix: ix.update(torch.randn(B, 2, W), torch.full((B, 2), N)), "slot ids in"),
        (lambda ix: ix.update(torch.full((B, 2, W), float("nan")), torch.zeros(B, 2, dtype=torch.int64)), "NaN"),
        (lambda ix: ix.update(torch.ones(B, 2, W, dtype=torch.int64), torch.zeros(B, 2, dtype=torch.int64)), "float"),
        (lambda ix: ix.search(torch.randn(B, R, W), 0), "k must be"),
        (lambda ix: ix.search(torch.randn(B, R, W), N + 1), "k must be"),
        (lambda ix: ix.search(torch.randn(B, W), 2), "queries must be"),
        (lambda ix: ix.search(torch.randn(B, R, W + 2), 2), "W=7"),
        (lambda ix: ix.reset(torch.ones(B, dtype=torch.int64)), "mask must be"),
        (lambda ix: setattr(ix, "initial", torch.zeros(W + 1)), "initial must be"),
    ],
)
@pytest.mark.parametrize("name", INDEXES)
def test_bad_input_errors(name, call, message):
    with pytest.raises(ValueError, match=message):
        call(build(name))


def test_bad_construction_errors():
    with pytest.raises(ValueError, match="num_slots N"):
        ExactIndex(2, 0, 4)
    with pytest.raises(ValueError, match="dtype"):
        ExactIndex(2, 8, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="index must be one of"):
        make_index("annoy", 2, 8, 4)


def test_stats_report_rows_and_bytes():
    index = ExactIndex(2, 100, W)
    index.update(torch.randn(2, 10, W), torch.arange(10).expand(2, -1))
    stats = index.stats()
    assert stats.rows == 20 and stats.tombstones == 0 and stats.buffered == 0
    assert stats.bytes >= 20 * W * 4


@pytest.mark.gpu
def test_exact_index_on_cuda_matches_cpu():
    g = torch.Generator().manual_seed(7)
    indexes = [ExactIndex(B, N, W, device=device, chunk_rows=16) for device in ("cpu", "cuda")]
    for _ in range(5):
        rows, ids = random_writes(g, 9)
        for index in indexes:
            index.update(rows.to(index.device), ids.to(index.device))
    queries = torch.randn(B, R, W, generator=g)
    (cpu_scores, cpu_ids), (gpu_scores, gpu_ids) = (ix.search(queries.to(ix.device), 8) for ix in indexes)
    assert gpu_ids.device.type == "cuda"
    torch.testing.assert_close(gpu_scores.cpu(), cpu_scores, **tolerance(torch.float32))
    assert torch.equal(gpu_ids.sort(-1).values.cpu(), cpu_ids.sort(-1).values)
