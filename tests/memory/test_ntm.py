"""NTMMemory with several write heads: the write against its definition, order, gradients, init."""

import pytest
import torch

import sparsemem as sm
from sparsemem import ops
from sparsemem.memory import NTMMemory
from tests.tolerances import tolerance

B, N, W, R, S = 2, 7, 3, 2, 3
F64 = tolerance(torch.float64)


def write_inputs(heads: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    memory = torch.randn(B, N, W, generator=g, dtype=torch.float64)
    write_w = torch.softmax(3 * torch.randn(B, heads, N, generator=g, dtype=torch.float64), -1)
    erase = torch.rand(B, heads, W, generator=g, dtype=torch.float64)
    add = torch.randn(B, heads, W, generator=g, dtype=torch.float64)
    return memory, write_w, erase, add


def write_by_definition(memory, write_w, erase, add):
    """Graves et al. 2014, eqs. 3-4, one number at a time: every head's erase multiplies the old
    value, then every head's add is summed in."""
    new = memory.clone()
    for b in range(B):
        for n in range(N):
            for w in range(W):
                value = memory[b, n, w]
                for h in range(write_w.shape[1]):
                    value = value * (1 - write_w[b, h, n] * erase[b, h, w])
                for h in range(write_w.shape[1]):
                    value = value + write_w[b, h, n] * add[b, h, w]
                new[b, n, w] = value
    return new


@pytest.mark.parametrize("heads", [1, 2, 3])
def test_the_write_heads_follow_the_definition(heads):
    inputs = write_inputs(heads)
    torch.testing.assert_close(NTMMemory._write(*inputs), write_by_definition(*inputs), **F64)


def test_the_order_of_the_write_heads_does_not_matter():
    memory, *heads = write_inputs(3)
    order = torch.tensor([2, 0, 1])
    reordered = [part[:, order] for part in heads]
    torch.testing.assert_close(NTMMemory._write(memory, *reordered), NTMMemory._write(memory, *heads), **F64)


def test_one_write_head_is_memory_write_and_an_idle_head_adds_nothing():
    memory, write_w, erase, add = write_inputs(2)
    alone = ops.memory_write(memory, write_w[:, 0], erase[:, 0], add[:, 0])
    torch.testing.assert_close(NTMMemory._write(memory, write_w[:, :1], erase[:, :1], add[:, :1]), alone, **F64)
    idle = write_w.clone()
    idle[:, 1] = 0
    torch.testing.assert_close(NTMMemory._write(memory, idle, erase, add), alone, **F64)


def test_gradcheck_through_steps_with_two_write_heads():
    torch.manual_seed(0)
    access = NTMMemory(N, W, R, shift_range=S, num_writes=2)
    state = access.init_state(B, dtype=torch.float64)
    assert state.write_weights.shape == (B, 2, N)
    interfaces = torch.randn(2, B, access.interface_size, dtype=torch.float64, requires_grad=True)
    memory = torch.randn(B, N, W, dtype=torch.float64, requires_grad=True)

    def run(interfaces, memory):
        current = access.init_state(B, memory=memory)
        for interface in interfaces:
            reads, current = access.step(current, access.split_interface(interface))
        return reads, current.memory, current.write_weights

    assert torch.autograd.gradcheck(run, (interfaces, memory))


def test_interface_layout_and_init_of_every_write_head():
    access = NTMMemory(N, W, R, shift_range=5, num_writes=3)
    head = W + 5 + 3
    assert access.interface_size == (R + 3) * head + 3 * 2 * W
    bias = torch.zeros(access.interface_size)
    access.init_interface_bias(bias)
    parts = access.split_interface(bias.unsqueeze(0))
    assert parts.erase.shape == parts.add.shape == (1, 3, W)
    torch.testing.assert_close(parts.write.gate, torch.sigmoid(torch.tensor(-3.0)).expand(1, 3))
    plus_one = torch.softmax(torch.tensor([0.0, 0, 0, 3, 0]), 0)  # offsets -2..2
    torch.testing.assert_close(parts.write.shift, plus_one.expand(1, 3, 5))
    assert torch.equal(bias[: R * head], torch.zeros(R * head))  # the read heads keep the Linear's init
    assert "num_writes=3" in repr(access)


def test_a_model_with_write_heads_trains_and_refuses_none():
    model = sm.NTM(4, 8, num_slots=N, word_size=W, num_reads=R, num_writes=2)
    y, state = model(torch.randn(B, 5, 4))
    y.square().sum().backward()
    assert state.write_weights.shape == (B, 2, N)
    assert model.interface.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="num_writes must be a positive int; got 0"):
        NTMMemory(N, W, num_writes=0)
