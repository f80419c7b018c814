"""sm.SAM and sm.SDNC as layers: the MemoryModel API on the sparse memories."""

import pytest
import torch

import sparsemem as sm

B, T, I, H, N, W, R, K, O = 3, 4, 5, 12, 9, 4, 2, 3, 6
MODELS = [sm.SAM, sm.SDNC]


def make(model_cls, **kwargs):
    torch.manual_seed(0)
    return model_cls(I, H, **(dict(num_slots=N, word_size=W, num_reads=R, k=K, output_size=O) | kwargs))


@pytest.mark.parametrize("model_cls", MODELS)
def test_shapes_and_gradients_reach_every_parameter(model_cls):
    model = make(model_cls)
    y, state = model(torch.randn(B, T, I))
    assert y.shape == (B, T, O) and state.reads.shape == (B, R, W)
    y.square().sum().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("model_cls", MODELS)
def test_chunks_continue_the_sequence(model_cls):
    x = torch.randn(B, 2 * T, I)
    whole, _ = make(model_cls)(x)
    model = make(model_cls)
    first, state = model(x[:, :T])
    second, _ = model(x[:, T:], state)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole)


@pytest.mark.parametrize("model_cls", MODELS)
def test_detach_cuts_the_graph(model_cls):
    model = make(model_cls)
    x = torch.randn(B, T, I, requires_grad=True)
    _, state = model(x)
    y, _ = model(torch.randn(B, T, I), state.detach())
    y.sum().backward()
    assert x.grad is None


@pytest.mark.parametrize("model_cls", MODELS)
def test_reset_rows_behave_like_fresh_sequences(model_cls):
    model = make(model_cls)
    x = torch.randn(B, T, I)
    _, state = model(torch.randn(B, T, I))
    mask = torch.tensor([True, False, True])
    y_reset, _ = model(x, state.reset(mask))
    y_fresh, _ = model(x)
    torch.testing.assert_close(y_reset[mask], y_fresh[mask])
    assert not torch.allclose(y_reset[~mask], y_fresh[~mask])


@pytest.mark.parametrize("model_cls", MODELS)
def test_preloaded_shared_memory_gets_a_gradient(model_cls):
    model = make(model_cls).double()
    rows = torch.randn(N, W, dtype=torch.float64, requires_grad=True)
    state = model.init_state(B, memory=rows)
    torch.testing.assert_close(state.memory.store.dense(), rows.detach().expand(B, N, W))
    y, _ = model(torch.randn(B, T, I, dtype=torch.float64), state)
    y.sum().backward()
    assert rows.grad is not None and rows.grad.abs().sum() > 0


def test_sparse_options_are_checked():
    with pytest.raises(ValueError, match="k must be"):
        sm.SAM(I, H, num_slots=4, k=5)
    with pytest.raises(ValueError, match="index must be one of"):
        sm.SAM(I, H, num_slots=N, k=K, index="annoy")
    with pytest.raises(ValueError, match="link_k must be"):
        sm.SDNC(I, H, num_slots=N, k=K, link_k=0)
