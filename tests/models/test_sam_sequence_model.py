"""sm.SAM's and sm.SDNC's forward runs its steps as one op on the cpp backend (sam_sequence,
sdnc_sequence; at most the memory class's sequence_max_slots slots): the same outputs, final state (an
SDNC's links too) and gradients (parameters, a preloaded memory and the state it started from) as
the step loop, padded or not, carried across calls; and the step loop wherever the op does not
apply."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

import sparsemem as sm
from tests.conftest import cpu_backends, sparse_step_loops
from tests.tolerances import tolerance

B, T, I, H, N, W, R, K, O = 3, 7, 4, 9, 13, 5, 2, 3, 3
LINK_K = 3  # < N: the SDNC's mutual top-K_L cut of its links drops entries
MODELS = [sm.SAM, sm.SDNC]
OP_NODE = {sm.SAM: "SamSequence", sm.SDNC: "SdncSequence"}
"""The name of the autograd node of the op each model runs its steps as."""

pytestmark = pytest.mark.skipif(
    any("cpp" not in cpu_backends(op) for op in ("sam_sequence", "sdnc_sequence")), reason="no cpp kernel here"
)


def make(model_cls, **options) -> sm.SAM | sm.SDNC:
    torch.manual_seed(0)
    if model_cls is sm.SDNC:
        options["link_k"] = LINK_K
    return model_cls(I, H, num_slots=N, word_size=W, num_reads=R, k=K, output_size=O, **options).double()


def uses_the_op(y: torch.Tensor, model_cls) -> bool:
    """Whether y's graph holds the model's sequence op."""
    seen, stack = set(), [y.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        if OP_NODE[model_cls] in node.name():
            return True
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


def links(access, num_slots: int) -> list[torch.Tensor]:
    """An SDNC's link matrices and precedence, dense (whatever order the entries are stored in);
    nothing for a SAM."""
    return list(access.links.dense(num_slots)) if hasattr(access, "links") else []


def run(model, lengths: torch.Tensor | None, preloaded: bool):
    """A state some steps in (from a preloaded memory that takes a gradient, or a fresh one), then two
    calls carrying it: outputs, the final state (dense memory, LRU stamps, weights, controller,
    reads, an SDNC's links), and the gradients of a loss on all of it for the parameters and the
    preloaded memory."""
    g = torch.Generator().manual_seed(1)
    memory = torch.randn(B, N, W, dtype=torch.float64, generator=g).requires_grad_(True)
    state = model.init_state(B, memory=memory if preloaded else None)
    _, state = model(torch.randn(B, 3, I, dtype=torch.float64, generator=g), state)
    x = torch.randn(B, T, I, dtype=torch.float64, generator=g)
    y1, middle = model(x, state, lengths=lengths)
    y2, end = model(x.flip(1), middle, lengths=lengths)
    access = end.access
    dense = access.memory.store.dense()
    values = [y1, y2, dense, end.reads, *end.controller, access.read_weights.weights, access.write_weights.weights]
    values += links(access, N)
    scale = torch.randn(B, T, O, dtype=torch.float64, generator=g)
    loss = (y1 * scale).sum() + (y2 * scale.flip(0)).sum() + sum(v.sin().sum() for v in values[2:])
    if hasattr(access, "links"):  # the stored link weights with their gradient, which dense() leaves out
        loss = loss + access.links.gather(torch.arange(2 * N).expand(B, -1))[1].sin().sum()
    leaves = [*model.parameters(), *([memory] if preloaded else [])]
    grads = torch.autograd.grad(loss, leaves)
    slots = torch.arange(N).expand(B, -1)
    indices = [access.read_weights.indices, access.write_weights.indices, access.usage.stamps(slots)]
    return values, indices, grads, y2


@pytest.mark.parametrize("model_cls", MODELS)
@pytest.mark.parametrize("preloaded", [False, True])
@pytest.mark.parametrize("lengths", [None, [7, 3, 5]])
def test_one_op_gives_the_step_loops_outputs_state_and_gradients(
    model_cls, lengths, preloaded, use_backend, monkeypatch
):
    """The op against the step loop on the same (cpp) backends, float64."""
    use_backend("cpp")
    lengths = None if lengths is None else torch.tensor(lengths)
    fused, fused_indices, fused_grads, y = run(make(model_cls), lengths, preloaded)
    assert uses_the_op(y, model_cls)
    sparse_step_loops(monkeypatch)
    stepped, stepped_indices, stepped_grads, y = run(make(model_cls), lengths, preloaded)
    assert not uses_the_op(y, model_cls)
    for got, want in zip((*fused, *fused_grads), (*stepped, *stepped_grads), strict=True):
        torch.testing.assert_close(got, want, **tolerance(torch.float64))
    for got, want in zip(fused_indices, stepped_indices, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("model_cls", MODELS)
def test_a_padded_batch_runs_as_one_op(model_cls, use_backend):
    use_backend("cpp")
    y, state = make(model_cls)(torch.randn(B, T, I, dtype=torch.float64), lengths=torch.tensor([7, 3, 5]))
    assert uses_the_op(y, model_cls)
    assert y[1, 3:].eq(0).all() and y[2, 5:].eq(0).all()
    assert state.access.step == T


@pytest.mark.parametrize("model_cls", MODELS)
@pytest.mark.parametrize("index", ["ivf", "faiss-ivf"])
def test_an_approximate_index_runs_the_op_with_an_exact_search(index, model_cls, use_backend):
    """At this N the op's scan is exact whatever the index; the index holds the rows it wrote, so
    the step loop carries on from them (here past sequence_max_slots)."""
    if index.startswith("faiss"):
        pytest.importorskip("faiss")
    use_backend("cpp")
    x = torch.randn(B, T, I, dtype=torch.float64)
    exact_y, _ = make(model_cls)(x)
    y, state = make(model_cls, index=index)(x)
    assert uses_the_op(y, model_cls)
    torch.testing.assert_close(y, exact_y, rtol=0, atol=0)
    # the index holds what the op wrote: each batch row's most recent write is its own nearest row
    store = state.access.memory.store
    slots = state.access.write_weights.indices[:, -1]  # the LRU slot of the last step, written wholly
    words = store.dense()[torch.arange(B), slots]
    assert torch.equal(store.search(words.unsqueeze(1), 1).view(B), slots)


@pytest.fixture
def one_rank_group():
    """A one-process gloo group (the shard_group of a model sharded over one rank), torn down after."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.mark.parametrize("model_cls", MODELS)
@pytest.mark.parametrize("case", ["gru controller", "torch backend", "over sequence_max_slots", "sharded"])
def test_the_step_loop_runs_where_the_op_does_not_apply(case, model_cls, use_backend, monkeypatch, request):
    use_backend("torch" if case == "torch backend" else "cpp")
    if case == "over sequence_max_slots":
        sparse_step_loops(monkeypatch, N - 1)
    options = {}
    if case == "gru controller":
        options["controller"] = nn.GRUCell(I + R * W, H)
    if case == "sharded":  # a subclass of the memory (its step may differ)
        options["shard_group"] = request.getfixturevalue("one_rank_group")
    y, _ = make(model_cls, **options)(torch.randn(B, T, I, dtype=torch.float64))
    assert not uses_the_op(y, model_cls)


@pytest.mark.parametrize("model_cls", MODELS)
def test_no_grad_runs_the_op_and_keeps_no_graph(model_cls, use_backend):
    use_backend("cpp")
    model = make(model_cls)
    x = torch.randn(B, T, I, dtype=torch.float64)
    with torch.no_grad():
        y, state = model(x)
    assert not y.requires_grad and state.access.read_weights.weights.grad_fn is None
    torch.testing.assert_close(y, model(x)[0].detach(), rtol=0, atol=0)


@pytest.mark.parametrize("model_cls", MODELS)
@pytest.mark.parametrize(
    ("batch", "steps", "num_slots", "heads", "k", "link_k", "word", "lengths"),
    [
        (1, 1, 1, 1, 1, 1, 1, None),
        (2, 5, 3, 3, 3, 3, 4, [5, 2]),
        (3, 2, 5, 2, 1, 1, 2, [2, 1, 2]),
        (1, 5, 9, 1, 9, 2, 4, None),
    ],
)
def test_corner_sizes_match_the_step_loop(
    model_cls, batch, steps, num_slots, heads, k, link_k, word, lengths, use_backend
):
    """One slot, K = N (every slot read), K_L = N and 1 (an SDNC's), one step, rows of length 1 in a
    padded batch. Where two rows are equal (a fresh memory's first writes can make them so) the op
    reads the lower slot (the reference's order) and the exact index the one written first: the
    values read agree, the slots and so the LRU's stamps may not. At K = N an SDNC's step loop can
    also leave two rows written alike an ulp apart (the op: equal), which orders them. These sizes
    and seeds draw no such tie (seed 1 does, at N = 3)."""
    use_backend("cpp")

    def run(one_op: bool):
        torch.manual_seed(3)
        sizes = dict(num_slots=num_slots, word_size=word, num_reads=heads, k=k, output_size=3)
        model = model_cls(3, 4, **sizes, **({"link_k": link_k} if model_cls is sm.SDNC else {})).double()
        model.memory.sequence_max_slots = num_slots if one_op else None
        x = torch.randn(batch, steps, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        y, state = model(x, lengths=None if lengths is None else torch.tensor(lengths))
        y2, state = model(x.flip(1), state)
        assert uses_the_op(y2, model_cls) == one_op
        grads = torch.autograd.grad(y.sum() + y2.square().sum(), list(model.parameters()))
        access = state.access
        values = [y, y2, access.memory.store.dense(), access.read_weights.weights, *links(access, num_slots), *grads]
        return values, access.read_weights.indices

    fused, fused_slots = run(True)
    stepped, stepped_slots = run(False)
    for got, want in zip(fused, stepped, strict=True):
        torch.testing.assert_close(got, want, **tolerance(torch.float64))
    assert torch.equal(fused_slots, stepped_slots)
