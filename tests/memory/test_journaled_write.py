"""The journaled write (JournaledMemory.write: one node, one in-place kernel) against the path it
replaced (gather, sparsemem.ops.sparse_write, scatter: three nodes), bit for bit, and every
backend of sparsemem.ops.journaled_write.journaled_write against the torch one."""

import pytest
import torch

from sparsemem import ops, reference
from sparsemem.memory import SAMMemory
from sparsemem.memory.journal import JournaledMemory
from sparsemem.memory.row_store import RowStore
from sparsemem.memory.sam import group_sum
from sparsemem.ops.journaled_write import journaled_write
from tests.conftest import cpu_backends
from tests.tolerances import tolerance

B, N, W, J = 3, 13, 5, 7
BACKENDS = cpu_backends("journaled_write")


@pytest.fixture
def nan_poisoned():
    """torch.empty (and at::empty in C++) starts as NaN: the store's unwritten rows and any output
    element a kernel skips show."""
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    assert torch.empty(4).isnan().all(), "the poisoning these tests rely on is off"
    yield
    torch.use_deterministic_algorithms(False)


def write_inputs(dtype, seed=0, batch=B, slots=N, j=J):
    """SAM-like write arguments on slots [B, J] with repeats: group-summed weights, `first`, and an
    erased slot per batch row (every entry of that slot erased)."""
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randint(0, slots, (batch, j), generator=g)
    chosen[:, 1] = chosen[:, 0]  # a repeat in every batch row
    raw = torch.rand(batch, j, generator=g, dtype=dtype)
    add = torch.randn(batch, W, generator=g, dtype=dtype)
    erase_rows = chosen == chosen[:, -1:]
    return chosen, raw, add, erase_rows


def make_store(dtype, preloaded, seed=1):
    """A store with a non-zero initial word and some slots written before (all, when preloaded)."""
    g = torch.Generator().manual_seed(seed)
    initial = torch.randn(W, generator=g, dtype=dtype)
    memory = torch.randn(B, N, W, generator=g, dtype=dtype) if preloaded else None
    store = RowStore(B, N, initial, memory)
    if not preloaded:
        slots = torch.stack([torch.randperm(N, generator=g)[:4] for _ in range(B)])
        store.write(store.row_ids(slots), torch.randn(B * 4, W, generator=g, dtype=dtype))
    return store


def three_node_write(memory: JournaledMemory, slots, weights, add, erase_rows, first):
    """The write as it was: gather the rows, sparse_write them, scatter them back."""
    rows = memory.gather(slots)
    memory.scatter(slots, ops.sparse_write(rows, weights, add, erase_rows), first)
    return rows


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("preloaded", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_write_equals_three_nodes_bit_for_bit(backend, preloaded, dtype, use_backend, nan_poisoned):
    use_backend(backend)
    results = []
    for fused in (True, False):
        store = make_store(dtype, preloaded)
        initial = torch.randn(B, N, W, dtype=dtype, generator=torch.Generator().manual_seed(1)).requires_grad_()
        memory = JournaledMemory(store, initial)
        slots, raw, add, erase_rows = write_inputs(dtype)
        raw.requires_grad_(True)
        add.requires_grad_(True)
        total, first = group_sum(slots, raw)
        for step in range(2):  # the second write reads rows the first wrote
            step_add = add * (step + 1)
            if fused:
                memory.write(slots, total, step_add, erase_rows, first)
            else:
                three_node_write(memory, slots, total, step_add, erase_rows, first)
        read = memory.gather(torch.cat([slots, torch.arange(N).expand(B, -1)], 1))
        seed = torch.randn(read.shape, dtype=dtype, generator=torch.Generator().manual_seed(3))
        grads = torch.autograd.grad((read * seed).sum(), (raw, add, initial), allow_unused=True)
        results.append((read.detach(), store.dense(), store.written.clone(), grads))
    (read, dense, written, grads), (want_read, want_dense, want_written, want_grads) = results
    assert torch.equal(read, want_read)
    assert torch.equal(dense, want_dense)
    assert torch.equal(written, want_written)
    assert not dense.isnan().any()
    for got, want in zip(grads, want_grads, strict=True):
        assert (got is None) == (want is None)
        if want is not None:
            assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", BACKENDS)
def test_journaled_write_matches_torch_backend(backend, dtype, use_backend, nan_poisoned):
    outputs = []
    for chosen in ("torch", backend):
        use_backend(chosen)
        store = make_store(dtype, preloaded=False)
        slots, raw, add, erase_rows = write_inputs(dtype, seed=5)
        total, _ = group_sum(slots, raw)
        ids = store.row_ids(slots).view(B, J)
        old, new, fresh = journaled_write(store.rows, store.written, store.initial_word, ids, total, add, erase_rows)
        outputs.append((old, new, fresh, store.dense(), store.written.clone()))
    (old, new, fresh, dense, written), (want_old, want_new, want_fresh, want_dense, want_written) = outputs
    # the journal entry is a copy: bit for bit; the write is arithmetic: to the tolerance
    assert torch.equal(old, want_old)
    assert torch.equal(fresh, want_fresh)
    torch.testing.assert_close(new, want_new, **tolerance(dtype))
    torch.testing.assert_close(dense, want_dense, **tolerance(dtype))
    assert torch.equal(written, want_written)


@pytest.mark.parametrize("backend", BACKENDS)
def test_journal_entry_is_the_rows_before_the_write(backend, use_backend, nan_poisoned):
    use_backend(backend)
    store = make_store(torch.float64, preloaded=False)
    slots, raw, add, erase_rows = write_inputs(torch.float64, seed=7)
    row_ids = store.row_ids(slots)
    before = store.read(row_ids).view(B, J, W)
    total, _ = group_sum(slots, raw)
    written_ids, old, new = store.sparse_write(slots, total, add, erase_rows)
    assert torch.equal(written_ids.view(-1), row_ids)
    assert torch.equal(old, before)  # unwritten slots: the initial word; a repeat: the row before
    torch.testing.assert_close(new, reference.sparse_write_ref(before, total, add, erase_rows), rtol=0, atol=0)
    assert torch.equal(store.read(row_ids).view(B, J, W), new)
    assert store.written[row_ids].all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_write_equals_grad_write(backend, use_backend):
    use_backend(backend)
    stores = []
    for grad in (True, False):
        store = make_store(torch.float32, preloaded=False)
        memory = JournaledMemory(store)
        slots, raw, add, erase_rows = write_inputs(torch.float32, seed=9)
        total, first = group_sum(slots, raw)
        with torch.set_grad_enabled(grad):
            memory.write(slots, total, add, erase_rows, first)
        assert (memory.journal._logged == []) != grad
        stores.append(store)
    assert torch.equal(stores[0].dense(), stores[1].dense())
    assert torch.equal(stores[0].written, stores[1].written)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_through_sam_steps(backend, use_backend):
    use_backend(backend)
    batch, slots, word, heads, k = 2, 5, 3, 2, 2
    module = SAMMemory(slots, word, heads, k=k).double()
    memory = torch.randn(batch, slots, word, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    interfaces = torch.randn(3, batch, module.interface_size, generator=torch.Generator().manual_seed(3))

    def run(memory, interfaces):
        state = module.init_state(batch, memory)
        reads = []
        for interface in interfaces:
            read, state = module.step(state, interface)
            reads.append(read)
        return torch.stack(reads)

    args = (memory.requires_grad_(True), interfaces.double().requires_grad_(True))
    # Triton's kernels run through the interpreter here (0.2 s a 3-step forward, 80 s for the full
    # Jacobian): fast mode checks it along random directions; the full check runs on the other
    # backends, and test_registered_ops gradchecks every Triton kernel in full.
    assert torch.autograd.gradcheck(run, args, fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_after_backward_equals_forward_only(backend, use_backend):
    use_backend(backend)
    module = SAMMemory(N, W, 2, k=3)
    interfaces = torch.randn(6, B, module.interface_size, generator=torch.Generator().manual_seed(5))
    stores = []
    for grad in (True, False):
        state = module.init_state(B)
        with torch.set_grad_enabled(grad):
            reads = []
            for interface in interfaces.requires_grad_(grad):
                read, state = module.step(state, interface)
                reads.append(read)
        if grad:
            torch.stack(reads).square().sum().backward()
        stores.append(state.memory.store)
    assert torch.equal(stores[0].dense(), stores[1].dense())


def test_journaled_write_rejects_bad_input():
    store = make_store(torch.float32, preloaded=False)
    slots, raw, add, erase_rows = write_inputs(torch.float32)
    row_ids = store.row_ids(slots).view(B, J)
    with pytest.raises(ValueError, match="keys"):
        journaled_write(store.rows, store.written, store.initial_word, row_ids + B * N, raw, add, erase_rows)
    with pytest.raises(ValueError, match="add contains NaN"):
        journaled_write(store.rows, store.written, store.initial_word, row_ids, raw, add * torch.nan, erase_rows)
    with pytest.raises(ValueError, match="erase_rows"):
        journaled_write(store.rows, store.written, store.initial_word, row_ids, raw, add, erase_rows.float())


@pytest.mark.parametrize("backend", BACKENDS)
def test_reset_between_steps_forgets_written_rows(backend, use_backend):
    # a reset forgets exactly the rows written in the reset batch rows: the log of written rows
    # (the kernel's `fresh`) holds each written row once
    use_backend(backend)
    module = SAMMemory(N, W, 2, k=3)
    state = module.init_state(B)
    g = torch.Generator().manual_seed(4)
    for step in range(12):
        interface = torch.randn(B, module.interface_size, generator=g)
        with torch.no_grad():
            _, state = module.step(state, interface)
        if step == 5:
            state = state.reset(torch.tensor([True, False, True]))
            store = state.memory.store
            assert not store.written[: B * N].view(B, N)[[0, 2]].any()
    store = state.memory.store
    assert store.written[: B * N].view(B, N)[1].sum() > 0
    logged = torch.cat(store._fresh_log)
    assert torch.equal(logged.sort().values, store.written[: B * N].nonzero().flatten())
