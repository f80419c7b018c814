"""NTM and DNC as layers: shapes, gradients, state handling, controllers, input checks, compile."""

import pytest
import torch
from torch import nn

import sparsemem as sm
from sparsemem.memory import DNCMemory, NTMMemory

B, T, I, H, N, W, R, O = 3, 4, 5, 12, 7, 4, 2, 6
MODELS = [sm.DNC, sm.NTM]


def make(model_cls, **kwargs):
    torch.manual_seed(0)
    options = dict(num_slots=N, word_size=W, num_reads=R, output_size=O) | kwargs
    return model_cls(I, H, **options)


@pytest.mark.parametrize("model_cls", MODELS)
def test_batch_first_shapes(model_cls):
    model = make(model_cls)
    y, state = model(torch.randn(B, T, I))
    assert y.shape == (B, T, O)
    assert state.memory.shape == (B, N, W)
    assert state.read_weights.shape == (B, R, N)
    assert state.write_weights.shape == ((B, 1, N) if model_cls is sm.NTM else (B, N))
    assert state.reads.shape == (B, R, W)

    time_major = make(model_cls, batch_first=False)
    x = torch.randn(B, T, I)
    y_time_major, _ = time_major(x.transpose(0, 1))
    assert y_time_major.shape == (T, B, O)
    torch.testing.assert_close(y_time_major.transpose(0, 1), model(x)[0])


@pytest.mark.parametrize("model_cls", MODELS)
def test_output_defaults_to_hidden_size(model_cls):
    y, _ = make(model_cls, output_size=None)(torch.randn(B, T, I))
    assert y.shape == (B, T, H)


@pytest.mark.parametrize("model_cls", MODELS)
def test_gradients_reach_every_parameter(model_cls):
    model = make(model_cls)
    y, _ = model(torch.randn(B, T, I))
    y.square().sum().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        assert torch.isfinite(parameter.grad).all(), name


@pytest.mark.parametrize("model_cls", MODELS)
def test_chunks_continue_the_sequence(model_cls):
    model = make(model_cls)
    x = torch.randn(B, T, I)
    whole, _ = model(x)
    first, state = model(x[:, :2])
    second, _ = model(x[:, 2:], state)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole)


@pytest.mark.parametrize("model_cls", MODELS)
def test_detach_cuts_the_graph(model_cls):
    model = make(model_cls)
    x = torch.randn(B, T, I, requires_grad=True)
    _, state = model(x)
    detached = state.detach()
    for value in (*detached.controller, detached.reads, detached.memory, detached.read_weights):
        assert not value.requires_grad
    y, _ = model(torch.randn(B, T, I), detached)
    y.sum().backward()
    assert x.grad is None
    # Without detach the second chunk's loss reaches the first chunk's input.
    y, _ = model(torch.randn(B, T, I), state)
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("model_cls", MODELS)
def test_reset_restarts_only_masked_rows(model_cls):
    model = make(model_cls)
    x = torch.randn(B, T, I)
    _, state = model(x)
    mask = torch.tensor([True, False, True])
    reset = state.reset(mask)
    fresh = model.init_state(B)
    for after, before, initial in (
        (reset.memory, state.memory, fresh.memory),
        (reset.read_weights, state.read_weights, fresh.read_weights),
        (reset.write_weights, state.write_weights, fresh.write_weights),
        (reset.reads, state.reads, fresh.reads),
        (reset.controller[0], state.controller[0], fresh.controller[0]),
    ):
        torch.testing.assert_close(after[mask], initial[mask])
        torch.testing.assert_close(after[~mask], before[~mask])
    # A reset row then behaves exactly like a fresh sequence.
    y_reset, _ = model(x, reset)
    y_fresh, _ = model(x)
    torch.testing.assert_close(y_reset[mask], y_fresh[mask])


def test_dnc_state_reset_covers_links_and_usage():
    model = make(sm.DNC)
    _, state = model(torch.randn(B, T, I))
    mask = torch.tensor([False, True, False])
    reset = state.reset(mask).access
    for name in ("usage", "link", "precedence"):
        assert getattr(reset, name)[mask].abs().sum() == 0, name
        torch.testing.assert_close(getattr(reset, name)[~mask], getattr(state.access, name)[~mask])


def test_dnc_interface_init_writes_to_free_slots_and_keeps_them():
    # DNCMemory.init_interface_bias (train's --interface-init new-slot): the gates an untrained
    # controller (zero interface output) gets
    model = sm.DNC(5, 8, num_slots=7, word_size=3, num_reads=2)
    default = model.interface.bias.detach().clone()
    model.memory.init_interface_bias(model.interface.bias)
    gates = model.memory.split_interface(model.interface.bias.detach().unsqueeze(0))
    sigmoid3 = torch.sigmoid(torch.tensor(3.0))
    torch.testing.assert_close(gates.allocation_gate, sigmoid3.expand(1, 1))
    torch.testing.assert_close(gates.write_gate, sigmoid3.expand(1, 1))
    torch.testing.assert_close(gates.free_gates, (1 - sigmoid3).expand(1, 2))
    torch.testing.assert_close(gates.read_modes[0], torch.softmax(torch.tensor([-3.0, 0, 0]), 0).expand(2, 3))
    # the keys, strengths, erase and write vector keep the Linear's own init
    kept = 2 * 3 + 2 + 3 * 3 + 1
    assert torch.equal(model.interface.bias[:kept], default[:kept])


def test_ntm_interface_init_moves_the_write_head_one_slot_on():
    # NTMMemory.init_interface_bias (train's --interface-init new-slot)
    model = sm.NTM(5, 8, num_slots=7, word_size=3, num_reads=2, shift_range=5)
    default = model.interface.bias.detach().clone()
    model.memory.init_interface_bias(model.interface.bias)
    heads = model.memory.split_interface(model.interface.bias.detach().unsqueeze(0))
    write = heads.write
    torch.testing.assert_close(write.gate, torch.sigmoid(torch.tensor([[-3.0]])))
    torch.testing.assert_close(write.shift[0, 0], torch.softmax(torch.tensor([0.0, 0, 0, 3, 0]), 0))  # offsets -2..2
    torch.testing.assert_close(write.sharpen, 1 + torch.nn.functional.softplus(torch.tensor([[3.0]])))
    reads = 2 * (3 + 5 + 3)
    assert torch.equal(model.interface.bias[:reads], default[:reads])
    with pytest.raises(ValueError, match="needs S >= 3"):
        sm.NTM(5, 8, shift_range=1).memory.init_interface_bias(default)


@pytest.mark.parametrize("model_cls", MODELS)
def test_preloaded_memory(model_cls):
    model = make(model_cls)
    rows = torch.randn(N, W)
    state = model.init_state(B, memory=rows)
    torch.testing.assert_close(state.memory, rows.expand(B, N, W))
    _, state = model(torch.randn(B, T, I), state)
    restarted = state.reset(torch.ones(B, dtype=torch.bool))
    torch.testing.assert_close(restarted.memory, rows.expand(B, N, W))
    with pytest.raises(ValueError, match=r"memory must be \[B, N, W\]"):
        model.init_state(B, memory=torch.randn(N + 1, W))


def test_preloaded_dnc_rows_are_used_and_zero_rows_free():
    model = make(sm.DNC)
    rows = torch.randn(B, N, W)
    rows[:, N // 2 :] = 0  # a knowledge base in the first half, room to write in the second
    state = model.init_state(B, memory=rows)
    expected = torch.zeros(B, N)
    expected[:, : N // 2] = 1
    assert torch.equal(state.access.usage, expected)
    assert torch.equal(state.reset(torch.ones(B, dtype=torch.bool)).access.usage, expected)
    # the first allocation goes to the first free row, never into the knowledge base
    allocation = sm.ops.allocation_weights(state.access.usage)
    assert torch.equal(allocation.argmax(-1), torch.full((B,), N // 2))
    # and a preloaded all-zero memory is a fresh one
    x = torch.randn(B, T, I)
    torch.testing.assert_close(model(x, model.init_state(B, memory=torch.zeros(N, W)))[0], model(x)[0])


class FeedForward(nn.Module):
    def __init__(self, inputs, hidden):
        super().__init__()
        self.layer = nn.Linear(inputs, hidden)

    def forward(self, x):
        return torch.tanh(self.layer(x))


class CustomRecurrent(nn.Module):
    """A controller with its own state, through init_state(B) and forward(x, state)."""

    def __init__(self, inputs, hidden):
        super().__init__()
        self.cell = nn.GRUCell(inputs, hidden)

    def init_state(self, batch_size):
        return (torch.zeros(batch_size, self.cell.hidden_size),)

    def forward(self, x, state):
        hidden = self.cell(x, state[0])
        return hidden, (hidden,)


@pytest.mark.parametrize("controller_cls", [FeedForward, CustomRecurrent, nn.GRUCell, nn.RNNCell])
def test_any_controller(controller_cls):
    controller = controller_cls(I + R * W, H)
    model = sm.DNC(I, H, num_slots=N, word_size=W, num_reads=R, controller=controller, output_size=O)
    y, state = model(torch.randn(B, T, I))
    assert y.shape == (B, T, O)
    y.sum().backward()
    assert all(p.grad is not None for p in controller.parameters())
    expected = 0 if controller_cls is FeedForward else 1
    assert len(state.controller) == expected
    state.detach().reset(torch.tensor([True, False, False]))


def test_controller_of_wrong_size_is_named():
    model = sm.DNC(I, H, num_slots=N, word_size=W, num_reads=R, controller=FeedForward(I + R * W, H + 1))
    with pytest.raises(ValueError, match=r"controller must map .* \[B, hidden_size\] = \[3, 12\]; got \[3, 13\]"):
        model(torch.randn(B, T, I))


@pytest.mark.parametrize("model_cls", MODELS)
def test_bad_input_gives_clear_errors(model_cls):
    model = make(model_cls)
    with pytest.raises(ValueError, match=r"x must be \[B, T, input_size\] with input_size=5; got \[3, 4, 6\]"):
        model(torch.randn(B, T, I + 1))
    with pytest.raises(ValueError, match=r"x must be \[B, T, input_size\]"):
        model(torch.randn(T, I))
    with pytest.raises(ValueError, match=r"x is torch.float64 but the model's parameters are torch.float32"):
        model(torch.randn(B, T, I, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"x must be a floating-point tensor; got torch.int64"):
        model(torch.ones(B, T, I, dtype=torch.long))
    _, state = model(torch.randn(B, T, I))
    with pytest.raises(ValueError, match="state is for a batch of B=3 but x has B=2"):
        model(torch.randn(2, T, I), state)
    with pytest.raises(ValueError, match=r"mask must be a bool tensor \[B\] with B=3"):
        state.reset(torch.tensor([1, 0, 1]))
    with pytest.raises(ValueError, match=r"mask must be a bool tensor \[B\] with B=3"):
        state.reset(torch.tensor([True, False]))


@pytest.mark.parametrize("model_cls", [sm.DNC, sm.NTM, sm.SAM, sm.SDNC])
def test_bypass_dropout_drops_only_the_controllers_path_to_the_output(model_cls):
    sizes = {sm.SAM: {"k": 2}, sm.SDNC: {"k": 2, "link_k": 2}}.get(model_cls, {})
    plain, dropped = make(model_cls, **sizes), make(model_cls, bypass_dropout=0.5, **sizes)
    dropped.load_state_dict(plain.state_dict())
    x = torch.randn(B, T, I)
    y_plain, plain_state = plain(x)
    y_train, train_state = dropped(x)
    # the interface and the reads never see the dropout: every step reads and writes as without it
    torch.testing.assert_close(train_state.reads, plain_state.reads)
    torch.testing.assert_close(train_state.controller, plain_state.controller)
    assert not torch.allclose(y_train, y_plain)
    dropped.eval()
    torch.testing.assert_close(dropped(x)[0], y_plain)


@pytest.mark.parametrize("value", [-0.1, 1.0, "0.5"])
def test_bypass_dropout_must_be_a_probability(value):
    with pytest.raises(ValueError, match=r"bypass_dropout must be a probability in \[0, 1\)"):
        sm.DNC(I, H, bypass_dropout=value)


def test_bad_sizes_give_clear_errors():
    with pytest.raises(ValueError, match="num_slots must be a positive int"):
        DNCMemory(0, W, R)
    with pytest.raises(ValueError, match="shift_range S must be odd"):
        NTMMemory(N, W, R, shift_range=2)
    with pytest.raises(ValueError, match="hidden_size must be a positive int"):
        sm.DNC(I, 0)


@pytest.mark.parametrize("model_cls", MODELS)
def test_float64(model_cls):
    model = make(model_cls).double()
    y, state = model(torch.randn(B, T, I, dtype=torch.float64))
    assert y.dtype == state.memory.dtype == torch.float64


@pytest.mark.slow
@pytest.mark.parametrize("model_cls", MODELS)
def test_torch_compile_matches_eager(model_cls):
    # aot_eager traces the whole unrolled model (dynamo, fake tensors, the ops' autograd) in
    # seconds; inductor compiles the same graph too, but takes minutes on 2 CPU cores.
    model = make(model_cls)
    x = torch.randn(B, 2, I)
    eager, _ = model(x)
    (eager_grad,) = torch.autograd.grad(eager.square().sum(), model.output.weight)
    compiled, state = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    (compiled_grad,) = torch.autograd.grad(compiled.square().sum(), model.output.weight)
    assert isinstance(state, sm.ModelState)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(compiled_grad, eager_grad)
