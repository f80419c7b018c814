"""States are values (DESIGN.md): a SAM or SDNC state can be reused, branched, reset and
cloned like nn.LSTM's (h, c), although its memory is changed in place; a forward that raises
leaves its input state as it was; what is kept for going back stays bounded in a stream."""

import gc
import weakref

import pytest
import torch

import sparsemem as sm
from sparsemem.memory.versions import COMPACT_EVERY
from tests.conftest import sparse_step_loops

B, T, I, H, N, W, R, K, O = 3, 5, 4, 10, 23, 5, 2, 3, 6
MODELS = [sm.NTM, sm.DNC, sm.SAM, sm.SDNC]
SPARSE = [sm.SAM, sm.SDNC]


@pytest.fixture(autouse=True, params=["one-op", "step-loop"])
def sparse_path(request, monkeypatch):
    """Every test twice: with sm.SAM's and sm.SDNC's steps as one op (sam_sequence, sdnc_sequence, at
    this N) and in their step loops."""
    if request.param == "step-loop":
        sparse_step_loops(monkeypatch)
    return request.param


def make(model_cls, index: str = "exact"):
    torch.manual_seed(0)
    sizes = dict(num_slots=N, word_size=W, num_reads=R, output_size=O)
    if model_cls in SPARSE:
        sizes.update(k=K, index=index)
    return model_cls(I, H, **sizes).double()


def inputs(seed: int, steps: int = T) -> torch.Tensor:
    return torch.randn(B, steps, I, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def warm_state(model, grad: bool = False):
    """A state some steps in, with rows written and (for SDNC) links made."""
    with torch.set_grad_enabled(grad):
        return model(inputs(1, 7))[1]


def gradients(model, y) -> list[torch.Tensor]:
    return torch.autograd.grad(y.square().sum(), list(model.parameters()), retain_graph=True)


def assert_equal_lists(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("model_cls", MODELS)
@pytest.mark.parametrize("detach", [False, True])
def test_the_same_state_twice_gives_the_same_outputs_and_gradients(model_cls, detach):
    model = make(model_cls)
    state = warm_state(model, grad=True)
    state = state.detach() if detach else state
    y1, s1 = model(inputs(2), state)
    g1 = gradients(model, y1)
    y2, s2 = model(inputs(2), state)
    g2 = gradients(model, y2)
    assert torch.equal(y1, y2)
    assert_equal_lists(g1, g2)
    # and the states they returned are both usable, in either order
    y3, _ = model(inputs(3), s2)
    y4, _ = model(inputs(3), s1)
    assert torch.equal(y3, y4)


@pytest.mark.parametrize("model_cls", MODELS)
def test_two_branches_in_one_backward_add_their_gradients(model_cls):
    model = make(model_cls)
    state = warm_state(model, grad=True)
    y1, _ = model(inputs(2), state)
    g1 = gradients(model, y1)
    y2, _ = model(inputs(3), state)
    g2 = gradients(model, y2)
    both = torch.autograd.grad(y1.square().sum() + y2.square().sum(), list(model.parameters()))
    for total, a, b in zip(both, g1, g2, strict=True):
        torch.testing.assert_close(total, a + b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("model_cls", MODELS)
def test_reset_returns_a_new_state_and_leaves_the_old_one(model_cls):
    model = make(model_cls)
    state = warm_state(model)
    before, _ = model(inputs(2), state)
    mask = torch.tensor([True, False, True])
    reset = state.reset(mask)
    after, _ = model(inputs(2), state)
    assert torch.equal(before, after)
    y_reset, _ = model(inputs(2), reset)
    y_fresh, _ = model(inputs(2))
    assert torch.equal(y_reset[mask], y_fresh[mask])
    assert torch.equal(y_reset[~mask], before[~mask])


class Fails(RuntimeError):
    pass


@pytest.mark.parametrize("model_cls", MODELS)
def test_a_forward_that_raises_leaves_its_state_as_it_was(model_cls, monkeypatch):
    """It raises at t = 3 of the step loop; on the cpp backend the DNC, SAM and SDNC run their steps
    as one op (dnc_sequence, sam_sequence, sdnc_sequence) and raise after it, in the output layer."""
    model = make(model_cls)
    state = warm_state(model)
    expected, _ = model(inputs(2), state)
    one_op = model._one_op(inputs(4).movedim(1, 0)) is not None
    layer = model.output if one_op else model.interface
    calls = 0
    forward = layer.forward

    def failing(x):
        nonlocal calls
        calls += 1
        if calls == (1 if one_op else 4):
            raise Fails("mid-forward")
        return forward(x)

    with monkeypatch.context() as patched, pytest.raises(Fails):
        patched.setattr(layer, "forward", failing)
        model(inputs(4), state)
    again, _ = model(inputs(2), state)
    assert torch.equal(again, expected)


@pytest.mark.parametrize("model_cls", MODELS)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_a_preloaded_memory_serves_many_backwards(model_cls, requires_grad):
    model = make(model_cls)
    rows = torch.randn(N, W, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    rows.requires_grad_(requires_grad)
    full = model.init_state(B, memory=rows)
    grads = []
    for _ in range(2):
        y, _ = model(inputs(2), full)
        y.square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()] + ([rows.grad.clone()] if requires_grad else []))
        model.zero_grad()
        rows.grad = None
    assert_equal_lists(*grads)


@pytest.mark.parametrize("model_cls", MODELS)
def test_beam_like_branching_over_three_states(model_cls):
    """Three branches from one state, stepped in turn: each equals the same branch run alone."""
    model = make(model_cls)
    root = warm_state(model)
    alone = []
    for branch in range(3):
        state, outputs = root, []
        for t in range(3):
            y, state = model(inputs(10 * branch + t, 2), state)
            outputs.append(y)
        alone.append(outputs)
    states, interleaved = [root] * 3, [[], [], []]
    for t in range(3):
        for branch in range(3):
            y, states[branch] = model(inputs(10 * branch + t, 2), states[branch])
            interleaved[branch].append(y)
    for a, b in zip(alone, interleaved, strict=True):
        assert_equal_lists(a, b)


@pytest.mark.parametrize("model_cls", MODELS)
def test_clone_is_an_independent_branch(model_cls):
    model = make(model_cls)
    state = warm_state(model)
    expected, _ = model(inputs(2), state)
    copy = state.clone()
    _, moved = model(inputs(3), state)
    y_copy, _ = model(inputs(2), copy)
    y_state, _ = model(inputs(2), state)
    assert torch.equal(y_copy, expected)
    assert torch.equal(y_state, expected)
    assert moved is not None


def _timeline(state):
    return state.access.memory.store.timeline


@pytest.mark.parametrize("model_cls", SPARSE)
def test_rows_restored_equal_rows_written_since(model_cls):
    model = make(model_cls)
    state = warm_state(model)
    timeline = _timeline(state)
    recorded = timeline.rows_recorded
    with torch.no_grad():
        _, after = model(inputs(2), state)
    written = timeline.rows_recorded - recorded
    if model_cls is sm.SAM:
        # the step loop records J = R*K + 1 rows per batch row per step; the one op (sam_sequence)
        # the distinct slots it wrote, once per call (each batch row's, padded to the most)
        assert 0 < written <= T * B * after.write_weights.indices.shape[1]
    undone = timeline.rows_undone
    with torch.no_grad():
        model(inputs(2), state)
    assert timeline.rows_undone - undone == written


@pytest.mark.parametrize("index", ["exact", "ivf", "faiss-ivf"])
@pytest.mark.parametrize("model_cls", SPARSE)
def test_going_back_and_forth_across_a_reset_restores_rows_and_index(model_cls, index):
    """A move over many steps updates the index once at its end, from the rows as they then are:
    back across a reset (rows written again) and forth across it (the reset again)."""
    if index.startswith("faiss"):
        pytest.importorskip("faiss")
    model = make(model_cls, index).float()
    x = inputs(2).float()
    with torch.no_grad():
        start = model(inputs(1, 7).float())[1]
        y_start, middle = model(x, start)
        middle = middle.reset(torch.tensor([True, False, True]))
        y_end, end = model(x, middle)
        y_after_end, _ = model(x, end)
        assert torch.equal(model(x, start)[0], y_start)  # back over 2T steps and the reset
        assert torch.equal(model(x, end)[0], y_after_end)  # forth again
        assert torch.equal(model(x, middle)[0], y_end)


@pytest.mark.slow
@pytest.mark.parametrize("model_cls", SPARSE)
def test_a_stream_keeps_a_bounded_undo_log(model_cls):
    model = make(model_cls)
    state = model.init_state(B)
    kept = []
    with torch.no_grad():
        for step in range(2000):
            _, state = model(inputs(step, 1), state)
            kept.append(_timeline(state).retained()[0])
    # pruned at least every COMPACT_EVERY steps while nothing older is held
    assert max(kept) <= 2 * COMPACT_EVERY + 1, max(kept)
    assert max(kept[1000:]) <= max(kept[:1000])


@pytest.mark.parametrize("model_cls", SPARSE)
def test_a_state_of_another_configuration_is_refused(model_cls):
    model = make(model_cls)
    other = model_cls(I, H, num_slots=N + 1, word_size=W, num_reads=R, k=K, output_size=O).double()
    with pytest.raises(ValueError, match="state"):
        model(inputs(2), other.init_state(B))


@pytest.mark.parametrize("model_cls", MODELS)
def test_a_nan_input_is_reported_as_the_input_and_changes_nothing(model_cls):
    model = make(model_cls)
    state = warm_state(model)
    expected, _ = model(inputs(2), state)
    x = inputs(4)
    x[1, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="x \\(the model input\\) contains NaN"):
        model(x, state)
    again, _ = model(inputs(2), state)
    assert torch.equal(again, expected)


@pytest.mark.parametrize("model_cls", SPARSE)
def test_a_dropped_state_frees_its_storage_at_once(model_cls):
    """No reference cycle holds a sparse memory's storage (rows, index, LRU, links) once its last
    state is gone: it is freed then, not at the cyclic GC's next pass (a fresh memory of 2^20 slots
    reserves GiBs of address space, and a GPU frees its memory only then). The changes a timeline
    records reach their storage through weak references."""
    model = make(model_cls)
    gc.disable()
    try:
        y, state = model(inputs(2), warm_state(model, grad=True))
        y.square().sum().backward()
        y, state = model(inputs(3), state.reset(torch.tensor([True, False, True])))
        store, usage = weakref.ref(state.access.memory.store), weakref.ref(state.access.usage)
        del state, y  # y's graph holds the store until then (its journal)
        assert store() is None and usage() is None
    finally:
        gc.enable()
