"""dnc_sequence, T steps of an LSTM-controlled DNC in one op: every backend that runs here against
the reference loop (outputs and gradients, odd sizes), gradcheck, opcheck, the C++ node against the
custom op, every checkpoint interval against every link kept (bit for bit), NaN-poisoned outputs,
input checks and a compile smoke test. The model that calls it
(models.DNC's forward) against its step loop is tests/models/test_dnc_sequence_model.py."""

import pytest
import torch

from sparsemem.ops.dnc_sequence import dnc_sequence
from sparsemem.reference import dnc_sequence_ref
from sparsemem.testing import op_inputs
from tests.conftest import cpu_backends
from tests.ops.sequences import leaves, outputs_and_grads
from tests.tolerances import tolerance

BACKENDS = cpu_backends("dnc_sequence")
SIZES = [dict(B=3, N=7, W=5, R=3), dict(B=1, N=33, W=3, R=1), dict(B=2, N=65, W=9, R=2)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, size, dtype, use_backend):
    use_backend(backend)
    args = op_inputs("dnc_sequence", dtype, **size)
    got, got_grads = outputs_and_grads(dnc_sequence, args)
    want, want_grads = outputs_and_grads(dnc_sequence_ref, args)
    assert len(got) == 9 and got[0].shape == (4, size["B"], 5) and got[1].shape == (4, size["B"], size["R"], size["W"])
    for a, b in zip((*got, *got_grads), (*want, *want_grads), strict=True):
        torch.testing.assert_close(a, b, **tolerance(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend, use_backend):
    use_backend(backend)
    args = leaves(op_inputs("dnc_sequence", torch.float64, B=2, N=5, W=3, R=2))
    assert torch.autograd.gradcheck(dnc_sequence, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, use_backend):
    use_backend(backend)
    args = leaves(op_inputs("dnc_sequence", torch.float64, B=2, N=5, W=3, R=2))
    torch.library.opcheck(torch.ops.sparsemem.dnc_sequence.default, args)


def test_the_cpp_node_and_the_custom_op_agree_bit_for_bit(use_backend):
    """Eager calls take the C++ node, which keeps its forward's tape; the registered custom op
    (torch.compile, opcheck) runs the forward again in its backward. Same numbers either way."""
    if "cpp" not in BACKENDS:
        pytest.skip("no cpp kernel here")
    use_backend("cpp")
    args = op_inputs("dnc_sequence", torch.float32, B=3, N=9, W=5, R=2)
    eager, eager_grads = outputs_and_grads(dnc_sequence, args)
    assert "DncSequence" in eager[0].grad_fn.name()
    registered, registered_grads = outputs_and_grads(torch.ops.sparsemem.dnc_sequence, args)
    for a, b in zip((*eager, *eager_grads), (*registered, *registered_grads), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("padded", [False, True])
def test_every_checkpoint_interval_gives_the_values_and_gradients_of_every_link_kept(padded, use_backend):
    """The links the backward rebuilds are the forward's, bit for bit (link_update and
    link_update_reads compute them alike), so no interval changes a value: 1 keeps every link,
    T + 1 rebuilds all from the first."""
    if "cpp" not in BACKENDS:
        pytest.skip("no cpp kernel here")
    use_backend("cpp")
    *args, _ = op_inputs("dnc_sequence", torch.float32, B=3, N=11, W=5, R=2)
    if not padded:
        args[13] = torch.ones_like(args[13])
    want, want_grads = outputs_and_grads(dnc_sequence, [*args, 1])
    for every in (2, 3, 4, 5):
        got, got_grads = outputs_and_grads(dnc_sequence, [*args, every])
        for a, b in zip((*got, *got_grads), (*want, *want_grads), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_writes_every_output_element(backend, use_backend, nan_poisoned):
    use_backend(backend)
    args = op_inputs("dnc_sequence", torch.float32, B=3, N=17, W=5, R=3)
    outputs, grads = outputs_and_grads(dnc_sequence, args)
    for value in (*outputs, *grads):
        assert value.isfinite().all()


def test_under_torch_compile():
    args = op_inputs("dnc_sequence", torch.float64, B=2, N=5, W=3, R=2)
    compiled = torch.compile(dnc_sequence, backend="aot_eager", fullgraph=True)
    got, got_grads = outputs_and_grads(compiled, args)
    want, want_grads = outputs_and_grads(dnc_sequence_ref, args)
    for a, b in zip((*got, *got_grads), (*want, *want_grads), strict=True):
        torch.testing.assert_close(a, b, **tolerance(torch.float64))


def f64(*shape):
    return torch.zeros(*shape, dtype=torch.float64)


@pytest.mark.parametrize(
    ("replaced", "message"),
    [
        ({0: f64(0, 2, 20), 13: torch.ones(0, 2, dtype=torch.bool)}, "T, B >= 1"),
        ({0: f64(4, 2, 18)}, r"gates_x \[T, B, 4H\]"),
        ({3: f64(2, 6)}, r"reads must be \[B, R, W\]"),
        ({10: f64(20, 5)}, r"weight_rh \[4H, R\*W \+ H\]"),
        ({11: f64(30, 5), 12: f64(30)}, r"weight_if \[I, H\] with I = R\*W \+ 3W \+ 5R \+ 3 = 28"),
        ({12: f64(9)}, "bias_if must be"),
        ({13: torch.ones(4, 3, dtype=torch.bool)}, r"active must be \[T, B\] with B=2"),
        ({13: torch.ones(4, 2)}, "active must be a bool mask"),
        ({4: torch.zeros(2, 5, 3)}, "memory is torch.float32"),
        ({14: 0}, "checkpoint_every must be a positive int; got 0"),
        ({14: 2.0}, "checkpoint_every must be a positive int; got 2.0"),
    ],
)
def test_bad_inputs_are_value_errors(replaced, message):
    args = list(op_inputs("dnc_sequence", torch.float64, B=2, N=5, W=3, R=2))
    for position, bad in replaced.items():
        args[position] = bad
    with pytest.raises(ValueError, match=message):
        dnc_sequence(*args)
