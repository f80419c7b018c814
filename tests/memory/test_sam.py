"""SAMMemory against reference/sam.py: forward, gradients, the journal, lazy rows, LRU, state."""

import pytest
import torch

from sparsemem import _checks
from sparsemem.memory import SAMInterface, SAMMemory, sam
from sparsemem.memory.journal import Journal
from sparsemem.memory.lru import TimestampLRU
from sparsemem.reference import content_read_ref
from sparsemem.reference.sam import access_update_ref, lru_ref, sam_step_ref, topk_read_ref
from sparsemem.testing import op_inputs
from tests.tolerances import tolerance

B, N, W, R, T = 3, 7, 5, 3, 5
FIELDS = ("keys", "strengths", "add", "write_gate", "interp_gate")


def interfaces(dtype=torch.float64, seed=1, steps=T, batch=B, heads=R, word=W):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.rand(*shape, generator=g, dtype=dtype)

    return [
        SAMInterface(
            torch.randn(batch, heads, word, generator=g, dtype=dtype),
            1 + 3 * rand(batch, heads),
            torch.randn(batch, word, generator=g, dtype=dtype),
            rand(batch),
            rand(batch),
        )
        for _ in range(steps)
    ]


def leaves(parts):
    return [getattr(p, f).requires_grad_(True) for p in parts for f in FIELDS]


def initial_memory(dtype=torch.float64):
    return torch.randn(B, N, W, generator=torch.Generator().manual_seed(2), dtype=dtype)


def run_sparse(parts, k, memory=None):
    module = SAMMemory(N, W, R, k=k).to(parts[0].add.dtype)
    state = module.init_state(B, memory)
    reads = []
    for part in parts:
        read, state = module.step(state, part)
        reads.append(read)
    return torch.stack(reads, 1), state


def run_dense(parts, k, memory=None):
    dtype = parts[0].add.dtype
    memory = torch.zeros(B, N, W, dtype=dtype) if memory is None else memory
    last_access = torch.zeros(B, N, dtype=torch.int64)
    read_w = torch.zeros(B, R, N, dtype=dtype)
    reads = []
    for t, p in enumerate(parts):
        read, read_w, _, memory, last_access = sam_step_ref(
            memory, last_access, read_w, p.keys, p.strengths, p.add, p.write_gate, p.interp_gate, k, t + 1
        )
        reads.append(read)
    return torch.stack(reads, 1), memory, read_w


def loss_of(reads):
    # couples every read to every other so all paths carry gradient
    return (reads**2).sum() + (reads * reads.sum()).sum()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("k", "preloaded"), [(N, False), (N, True), (3, True)])
def test_steps_match_dense_reference(k, preloaded, dtype):
    # K < N only on a random preloaded memory: a fresh one has ties among unwritten slots
    parts = interfaces(dtype)
    memory = initial_memory(dtype) if preloaded else None
    reads, state = run_sparse(parts, k, memory)
    want_reads, want_memory, want_read_w = run_dense(parts, k, memory)
    torch.testing.assert_close(reads, want_reads, **tolerance(dtype))
    torch.testing.assert_close(state.memory.store.dense(), want_memory, **tolerance(dtype))
    torch.testing.assert_close(state.read_weights.dense(N), want_read_w, **tolerance(dtype))


@pytest.mark.parametrize(("k", "preloaded"), [(N, False), (N, True), (3, True)])
def test_gradients_match_dense_reference(k, preloaded):
    parts = interfaces()
    inputs = leaves(parts)
    memory = initial_memory().requires_grad_(True) if preloaded else None
    if memory is not None:
        inputs.append(memory)
    reads, _ = run_sparse(parts, k, memory)
    got = torch.autograd.grad(loss_of(reads), inputs)
    want = torch.autograd.grad(loss_of(run_dense(parts, k, memory)[0]), inputs)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **tolerance(torch.float64))


def test_gradcheck_through_the_journal():
    batch, slots, word, heads, k = 1, 5, 3, 2, 3
    module = SAMMemory(slots, word, heads, k=k).double()
    parts = interfaces(steps=2, batch=batch, heads=heads, word=word)
    memory = torch.randn(batch, slots, word, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def run(memory, *tensors):
        state = module.init_state(batch, memory)
        reads = []
        for i in range(len(parts)):
            read, state = module.step(state, SAMInterface(*tensors[5 * i : 5 * i + 5]))
            reads.append(read)
        return torch.stack(reads)

    assert torch.autograd.gradcheck(run, (memory.requires_grad_(True), *leaves(parts)))


def test_memory_after_backward_is_bit_identical_to_forward_only():
    with torch.no_grad():
        _, forward_only = run_sparse(interfaces(torch.float32), 4, initial_memory(torch.float32))
    parts = interfaces(torch.float32)
    reads, state = run_sparse(parts, 4, initial_memory(torch.float32))
    loss_of(reads).backward()
    assert torch.equal(state.memory.store.dense(), forward_only.memory.store.dense())


def test_no_journal_under_no_grad():
    with torch.no_grad():
        _, state = run_sparse(interfaces(), 4)
    assert state.memory.journal._logged == []


def test_gradient_buffer_holds_only_touched_rows(monkeypatch):
    sizes = []
    finish = Journal.finish

    def recording_finish(self):
        row_ids, grad = finish(self)
        sizes.append(grad.shape[0])
        return row_ids, grad

    monkeypatch.setattr(Journal, "finish", recording_finish)
    module = SAMMemory(1 << 16, 4, 2, k=4)
    state = module.init_state(2)
    parts = interfaces(torch.float32, batch=2, heads=2, word=4)
    reads = []
    for part in parts:
        read, state = module.step(state, part)
        reads.append(read)
    loss_of(torch.stack(reads)).backward()
    # one buffer row per logged access (repeats kept: no sync for a unique): per sample and step
    # the write logs R*K + 1 rows and the read gathers R*K
    assert 0 < sizes[0] <= 2 * T * ((2 * 4 + 1) + 2 * 4)
    assert state.memory.store.index.stats().rows <= 2 * T * (2 * 4 + 1)


def test_lru_in_blocks_matches_argmin_of_last_access():
    g = torch.Generator().manual_seed(0)
    lru = TimestampLRU(B, N, "cpu", block=3)
    last_access = torch.zeros(B, N, dtype=torch.int64)
    slots = torch.arange(N).expand(B, -1)
    for step in range(1, 20):
        assert torch.equal(lru.least_recent(), lru_ref(last_access))
        write_w = torch.rand(B, N, generator=g) * (torch.rand(B, N, generator=g) < 0.3)
        read_w = torch.zeros(B, 1, N)
        last_access = access_update_ref(last_access, write_w, read_w, step)
        lru.touch(slots, write_w > 0.005)


def test_detach_cuts_the_graph_and_keeps_the_rows():
    module = SAMMemory(N, W, R, k=4).double()
    state = module.init_state(B)
    first, second = interfaces(steps=2), interfaces(seed=3, steps=2)
    first_leaves = leaves(first)
    for part in first:
        _, state = module.step(state, part)
    rows = state.memory.store.dense().clone()
    state = state.detach()
    assert torch.equal(state.memory.store.dense(), rows)
    for part in second:
        read, state = module.step(state, part)
    read.sum().backward()
    assert all(leaf.grad is None for leaf in first_leaves)
    assert second[0].add.grad is None  # no requires_grad there: nothing leaks either way


def test_reset_restarts_only_the_masked_samples():
    module = SAMMemory(N, W, R, k=4).double()
    parts = interfaces(steps=3)
    state = module.init_state(B)
    for part in interfaces(seed=5, steps=3):
        _, state = module.step(state, part)
    state = state.reset(torch.tensor([True, False, True]))
    fresh = module.init_state(B)
    for part in parts:
        read, state = module.step(state, part)
        want, fresh = module.step(fresh, part)
    torch.testing.assert_close(read[[0, 2]], want[[0, 2]], **tolerance(torch.float64))
    assert not torch.allclose(read[1], want[1])


def test_reset_under_grad_stops_gradient_at_the_reset():
    module = SAMMemory(N, W, R, k=4).double()
    state = module.init_state(B)
    before = interfaces(steps=2)
    add = before[-1].add.requires_grad_(True)
    for part in before:
        _, state = module.step(state, part)
    state = state.reset(torch.ones(B, dtype=torch.bool))
    read, state = module.step(state, interfaces(seed=4, steps=1)[0])
    (grad,) = torch.autograd.grad(read.sum(), add, allow_unused=True)
    assert grad is None or torch.count_nonzero(grad) == 0


def test_fresh_memory_is_lazy():
    module = SAMMemory(1 << 17, 8, 2, k=4)
    state = module.init_state(2)
    with torch.no_grad():
        for part in interfaces(torch.float32, batch=2, heads=2, word=8, steps=3):
            _, state = module.step(state, part)
    assert state.memory.store.index.stats().rows <= 3 * 2 * (2 * 4 + 1)


def test_topk_read_with_k_n_is_the_dense_content_read():
    memory, keys, strengths = op_inputs("content_read", torch.float64, B=B, N=N, W=W, R=R)
    for got, want in zip(
        topk_read_ref(memory, keys, strengths, N), content_read_ref(memory, keys, strengths), strict=True
    ):
        torch.testing.assert_close(got, want, **tolerance(torch.float64))


def test_reset_of_a_preloaded_sample_forgets_all_its_rows():
    module = SAMMemory(N, W, R, k=4).double()
    state = module.init_state(B, initial_memory())
    state = state.reset(torch.tensor([False, True, False]))
    dense = state.memory.store.dense()
    assert torch.equal(dense[1], torch.zeros(N, W, dtype=torch.float64))
    assert torch.equal(dense[0], initial_memory()[0])


@pytest.mark.parametrize("index", ["exact", "faiss-ivf"])
def test_a_preload_fills_in_chunks_and_indexes_with_one_load(monkeypatch, index):
    """The full regime: rows land chunk by chunk, then one Index.load builds the index from all of them."""
    if index.startswith("faiss"):
        pytest.importorskip("faiss")
    from sparsemem.index import Index

    loads = []
    original = Index.load
    monkeypatch.setattr(Index, "load", lambda self, rows: (loads.append(rows.shape), original(self, rows))[1])
    num_slots, batch = 300, 2
    module = SAMMemory(num_slots, W, R, k=4, index=index)
    state = module.init_state(batch)
    words = torch.randn(batch, num_slots, W, generator=torch.Generator().manual_seed(3))
    state.memory.store.preload(lambda b, start, end: words[b, start:end], chunk=64)
    assert loads == [(batch, num_slots, W)]
    store = state.memory.store
    assert torch.equal(store.dense(), words)
    stats = store.index.stats()
    assert stats.rows == batch * num_slots and stats.buffered == 0 and stats.merges == 0
    _, top = store.index.search(words[:, :5], 1)
    assert torch.equal(top[..., 0], torch.arange(5).expand(batch, -1))


@pytest.mark.parametrize("path", ["pairwise", "host", "device"])
def test_group_sum_agrees_with_a_loop_on_each_path(path, monkeypatch):
    """Small inputs compare every pair of entries, larger ones take numpy on the host and a sort on
    a device: each gives a loop's group sums and first occurrences, and gradcheck's gradients."""
    if path != "pairwise":
        monkeypatch.setattr(sam, "PAIRWISE_COMPARISONS", 0)
    if path == "device":
        monkeypatch.setattr(_checks, "on_host", lambda device: False)
    g = torch.Generator().manual_seed(0)
    indices = torch.randint(0, 6, (3, 2, 9), generator=g)  # 9 entries over 6 slots: repeats in every row
    values = torch.rand(3, 2, 9, generator=g, dtype=torch.float64, requires_grad=True)
    total, first = sam.group_sum(indices, values)
    rows = zip(indices.view(-1, 9).tolist(), values.detach().view(-1, 9), strict=True)
    for row, (ids, row_values) in enumerate(rows):
        for e, slot in enumerate(ids):
            same = [j for j, other in enumerate(ids) if other == slot]
            assert total.view(-1, 9)[row, e].item() == pytest.approx(row_values[same].sum().item())
            assert first.view(-1, 9)[row, e].item() == (same[0] == e)
    assert torch.autograd.gradcheck(lambda v: sam.group_sum(indices, v)[0], (values,))
