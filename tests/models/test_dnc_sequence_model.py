"""sm.DNC's forward runs its steps as one dnc_sequence op on the cpp backend: the same
outputs, final state and gradients (parameters and the state it started from) as the step loop,
padded or not, carried across calls, with every link kept or one in k; and the step loop wherever
the op does not apply."""

import dataclasses
import os

import pytest
import torch
from torch import nn

import sparsemem as sm
from tests.conftest import cpu_backends
from tests.tolerances import tolerance

B, T, I, H, N, W, R, O = 3, 7, 4, 9, 6, 5, 2, 3

pytestmark = pytest.mark.skipif("cpp" not in cpu_backends("dnc_sequence"), reason="no cpp kernel here")


def make(**options) -> sm.DNC:
    torch.manual_seed(0)
    return sm.DNC(I, H, num_slots=N, word_size=W, num_reads=R, output_size=O, **options).double()


def start_state(model: sm.DNC) -> sm.ModelState:
    """A state mid-episode whose every tensor is a leaf that takes a gradient."""
    g = torch.Generator().manual_seed(5)
    model.eval()
    with torch.no_grad():
        _, state = model(torch.randn(B, 3, I, dtype=torch.float64, generator=g))
    model.train()

    def leaf(x):
        return x.detach().clone().requires_grad_(True)

    fields = state.access._recurrent_fields()
    access = dataclasses.replace(state.access, **{k: leaf(getattr(state.access, k)) for k in fields})
    return sm.ModelState(tuple(leaf(c) for c in state.controller), access, leaf(state.reads))


def state_tensors(state: sm.ModelState) -> list[torch.Tensor]:
    return [*state.controller, *(getattr(state.access, k) for k in state.access._recurrent_fields()), state.reads]


def run(model: sm.DNC, backend: str, lengths: torch.Tensor | None):
    """Two calls carrying the state, from a state mid-episode: outputs, final state, and the
    gradients of a loss on both calls' outputs and the final state, for the parameters and the
    starting state."""
    os.environ["SPARSEMEM_BACKEND"] = backend
    state = start_state(model)
    start = state_tensors(state)
    x = torch.randn(B, T, I, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y1, middle = model(x, state, lengths=lengths)
    y2, end = model(x.flip(1), middle, lengths=lengths)
    scale = torch.randn(B, T, O, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    loss = (y1 * scale).sum() + (y2 * scale.flip(0)).sum() + sum(t.sin().sum() for t in state_tensors(end))
    grads = torch.autograd.grad(loss, [*model.parameters(), *start])
    return [y1, y2, *state_tensors(end)], grads, end


@pytest.mark.parametrize("lengths", [None, [7, 3, 5]])
@pytest.mark.parametrize("case", ["", "no-bias controller", "links checkpointed"])
def test_one_op_gives_the_step_loops_outputs_state_and_gradients(lengths, case, monkeypatch):
    """cpp (the one op) against the torch backend (the step loop over the reference ops), float64."""
    monkeypatch.setenv("SPARSEMEM_BACKEND", "cpp")
    options = {"controller": nn.LSTMCell(I + R * W, H, bias=False)} if case == "no-bias controller" else {}
    model = make(**options)
    if case == "links checkpointed":
        model.memory.link_checkpoint_bytes = 0  # every link size is "large"
        model.memory.sequence_link_bytes = 5 * B * N * N * 8  # room for 5 of T = 7 links: one in 2 kept
    lengths = None if lengths is None else torch.tensor(lengths)
    fused, fused_grads, end = run(model, "cpp", lengths)
    assert "DncSequence" in end.access.memory.grad_fn.name()
    stepped, stepped_grads, end = run(model, "torch", lengths)
    assert "DncSequence" not in end.access.memory.grad_fn.name()
    for got, want in zip((*fused, *fused_grads), (*stepped, *stepped_grads), strict=True):
        torch.testing.assert_close(got, want, **tolerance(torch.float64))


def test_a_padded_batch_runs_as_one_op(use_backend):
    use_backend("cpp")
    model = make()
    x = torch.randn(B, T, I, dtype=torch.float64)
    y, state = model(x, lengths=torch.tensor([7, 3, 5]))
    assert "DncSequence" in state.access.memory.grad_fn.name()
    assert y[1, 3:].eq(0).all() and y[2, 5:].eq(0).all()


@pytest.mark.parametrize(
    ("budget", "every"),
    [(16, 1), (9, 2), (8, 3), (1, 4), (0, 4)],  # in links of 2^20 bytes; held: ceil(16 / k) + k - 1
)
def test_the_op_keeps_one_link_in_the_smallest_k_that_fits_sequence_link_bytes(budget, every):
    memory = sm.DNC(I, H, num_slots=256, word_size=W, num_reads=R).memory
    state = memory.init_state(4)  # 4 x 256 x 256 float32: 2^20 bytes a link
    memory.sequence_link_bytes = budget * 2**20
    assert memory.sequence_checkpoint_every(state, 16) == every
    memory.link_checkpoint_every = None  # the step loop keeps every link: the op too
    assert memory.sequence_checkpoint_every(state, 16) == 1
    small = sm.DNC(I, H, num_slots=N, word_size=W, num_reads=R).memory  # links under link_checkpoint_bytes
    small.sequence_link_bytes = 0
    assert small.sequence_checkpoint_every(small.init_state(4), 16) == 1


def test_large_links_run_as_one_op_whatever_t(use_backend):
    use_backend("cpp")
    model = make()
    model.memory.link_checkpoint_bytes, model.memory.sequence_link_bytes = 0, 0
    _, state = model(torch.randn(B, T, I, dtype=torch.float64))
    assert "DncSequence" in state.access.memory.grad_fn.name()


@pytest.mark.parametrize("case", ["gru controller", "torch backend"])
def test_the_step_loop_runs_where_the_op_does_not_apply(case, use_backend):
    use_backend("torch" if case == "torch backend" else "cpp")
    model = make(controller=nn.GRUCell(I + R * W, H)) if case == "gru controller" else make()
    _, state = model(torch.randn(B, T, I, dtype=torch.float64))
    assert "DncSequence" not in state.access.memory.grad_fn.name()


def test_no_grad_runs_the_op_and_keeps_no_graph(use_backend):
    use_backend("cpp")
    model = make()
    x = torch.randn(B, T, I, dtype=torch.float64)
    with torch.no_grad():
        y, state = model(x)
    assert state.access.memory.grad_fn is None and not y.requires_grad
    torch.testing.assert_close(y, model(x)[0].detach(), rtol=0, atol=0)
