"""Padded batches: model(x, lengths=...) gives each row what it gives when run alone."""

import pytest
import torch

import sparsemem as sm
from tests.tolerances import tolerance

B, T, I, H, N, W, R, K, O = 3, 6, 4, 10, 19, 5, 2, 3, 6
LENGTHS = [6, 2, 4]
MODELS = [sm.NTM, sm.DNC, sm.SAM, sm.SDNC]
SPARSE = (sm.SAM, sm.SDNC)
F64 = tolerance(torch.float64)


def make(model_cls):
    torch.manual_seed(0)
    sizes = dict(num_slots=N, word_size=W, num_reads=R, output_size=O)
    if model_cls in SPARSE:
        sizes["k"] = K
    return model_cls(I, H, **sizes).double()


def memory_of(state, b: int) -> torch.Tensor:
    memory = state.memory
    return (memory.store.dense() if hasattr(memory, "store") else memory)[b]


def dense_weights(weights, b: int) -> torch.Tensor:
    return (weights.dense(N) if hasattr(weights, "dense") else weights)[b]


SCALE = torch.randn(B, T, O, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


def run(model, x, scale, lengths=None):
    """Outputs, final state and the parameter gradients of a loss on the unpadded steps, each
    output weighed by scale [B, T, O] (0: not counted)."""
    y, state = model(x, lengths=lengths)
    mask = torch.ones(y.shape[:2], dtype=torch.bool) if lengths is None else torch.arange(x.shape[1]) < lengths[:, None]
    counted = scale[:, :, :1] != 0
    loss = (y * scale * mask.unsqueeze(-1)).sum() + (state.reads.square() * counted[:, :1]).sum()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return y.detach(), state, grads


def run_alone(model, x, b: int, length: int):
    """Row b's story run alone, as row 0 of a batch of B copies of it: the same batch size takes
    the same BLAS paths, whose rounding the DNC's allocation sort would otherwise magnify."""
    scale = torch.zeros_like(SCALE[:, :length])
    scale[0] = SCALE[b, :length]
    return run(model, x[b : b + 1, :length].expand(B, -1, -1), scale)


@pytest.mark.parametrize("model_cls", MODELS)
def test_a_padded_batch_equals_each_row_run_alone(model_cls):
    model = make(model_cls)
    x = torch.randn(B, T, I, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor(LENGTHS)
    y, state, grads = run(model, x, SCALE, lengths)
    total = [torch.zeros_like(g) for g in grads]
    for b, length in enumerate(LENGTHS):
        y_b, state_b, grads_b = run_alone(model, x, b, length)
        torch.testing.assert_close(y[b, :length], y_b[0], **F64)
        assert torch.equal(y[b, length:], torch.zeros_like(y[b, length:]))
        torch.testing.assert_close(state.reads[b], state_b.reads[0], **F64)
        for mine, alone in zip(state.controller, state_b.controller, strict=True):
            torch.testing.assert_close(mine[b], alone[0], **F64)
        torch.testing.assert_close(memory_of(state, b), memory_of(state_b, 0), **F64)
        torch.testing.assert_close(dense_weights(state.read_weights, b), dense_weights(state_b.read_weights, 0), **F64)
        if model_cls in SPARSE:
            assert state.access.usage.least_recent()[b] == state_b.access.usage.least_recent()[0]
            written = state.memory.store.written[b * N : (b + 1) * N]
            assert torch.equal(written, state_b.memory.store.written[:N])
            assert state.memory.store.index.stats().rows == int(state.memory.store.written[: B * N].sum())
        if model_cls is sm.SDNC:
            mine, alone = state.access.links.dense(N), state_b.access.links.dense(N)
            for a, c in zip(mine, alone, strict=True):
                torch.testing.assert_close(a[b], c[0], **F64)
        total = [t + g for t, g in zip(total, grads_b, strict=True)]
    for got, want in zip(grads, total, strict=True):
        torch.testing.assert_close(got, want, **F64)


@pytest.mark.parametrize("model_cls", [sm.DNC, sm.SAM])
def test_lengths_are_checked(model_cls):
    model = make(model_cls)
    x = torch.randn(B, T, I, dtype=torch.float64)
    with pytest.raises(ValueError, match="lengths must be an int64 tensor"):
        model(x, lengths=torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="lengths must be an int64 tensor"):
        model(x, lengths=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"lengths must be in \[1, T=6\]"):
        model(x, lengths=torch.tensor([0, 2, 3]))
    with pytest.raises(ValueError, match=r"lengths must be in \[1, T=6\]"):
        model(x, lengths=torch.tensor([7, 2, 3]))


class OldStep(sm.memory.Memory):
    """A memory written before padded batches: step(state, interface), no `active`."""

    def __init__(self, inner):
        super().__init__(inner.num_slots, inner.word_size, inner.num_reads)
        self.inner = inner

    @property
    def interface_size(self):
        return self.inner.interface_size

    def split_interface(self, interface):
        return self.inner.split_interface(interface)

    def init_state(self, batch_size, memory=None, device=None, dtype=None):
        return self.inner.init_state(batch_size, memory, device, dtype)

    def step(self, state, interface):
        return self.inner.step(state, interface)


def test_a_memory_without_padding_support_still_runs_unpadded_batches():
    torch.manual_seed(0)
    model = sm.MemoryModel(OldStep(sm.memory.DNCMemory(N, W, R)), I, H).double()
    x = torch.randn(B, T, I, dtype=torch.float64)
    y, state = model(x)
    y2, _ = model(x, state)
    assert y.shape == (B, T, H) and torch.isfinite(y2).all()
