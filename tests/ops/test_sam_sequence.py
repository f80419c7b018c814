"""sam_sequence, T steps of an LSTM-controlled SAM in one op: every backend that runs here against the
reference loop (outputs and gradients, odd sizes), gradcheck, opcheck, the C++ node against the
custom op, NaN-poisoned outputs, input checks and a compile smoke test. The model that calls it
(models.SAM's forward) against its step loop is tests/models/test_sam_sequence_model.py."""

import pytest
import torch

from sparsemem.ops.sam_sequence import sam_sequence
from sparsemem.reference import sam_sequence_ref
from sparsemem.testing import op_inputs
from tests.conftest import cpu_backends
from tests.ops.sequences import leaves, outputs_and_grads
from tests.tolerances import tolerance

BACKENDS = cpu_backends("sam_sequence")
SIZES = [dict(B=3, N=7, W=5, R=3), dict(B=1, N=33, W=3, R=1), dict(B=2, N=65, W=9, R=2)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, size, dtype, use_backend):
    use_backend(backend)
    args = op_inputs("sam_sequence", dtype, **size)
    got, got_grads = outputs_and_grads(sam_sequence, args)
    want, want_grads = outputs_and_grads(sam_sequence_ref, args)
    B, R, W = (size[letter] for letter in "BRW")
    assert len(got) == 10 and got[0].shape == (4, B, 5) and got[1].shape == (4, B, R, W)
    assert got[9].dtype == torch.bool and got[9].any(), "the op reports the slots it wrote"
    for a, b in zip((*got, *got_grads), (*want, *want_grads), strict=True):
        torch.testing.assert_close(a, b, **tolerance(dtype))


def test_the_inputs_exercise_the_step():
    """The test inputs reach every branch: padded rows, the LRU slot among the rows read, accesses
    stamped, and reads of unwritten slots (score 0) beside written ones."""
    args = op_inputs("sam_sequence", torch.float64, B=3, N=7, W=5, R=3)
    out = sam_sequence_ref(*args)
    active, clock = args[14], args[15]
    assert not active.all() and active[0].all()
    assert (out[4] > clock).any(), "some slots were accessed"
    assert (~args[6].gather(-1, out[5].flatten(1))).any(), "some reads landed on slots never written before"


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend, use_backend):
    use_backend(backend)
    args = leaves(op_inputs("sam_sequence", torch.float64, B=2, N=6, W=3, R=2))
    assert torch.autograd.gradcheck(lambda *a: tuple(o for o in sam_sequence(*a) if o.is_floating_point()), args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, use_backend):
    use_backend(backend)
    args = leaves(op_inputs("sam_sequence", torch.float64, B=2, N=6, W=3, R=2))
    torch.library.opcheck(torch.ops.sparsemem.sam_sequence.default, args)


def test_the_cpp_node_and_the_custom_op_agree_bit_for_bit(use_backend):
    """Eager calls take the C++ node, which keeps its forward's tape; the registered custom op
    (torch.compile, opcheck) runs the forward again in its backward. Same numbers either way."""
    if "cpp" not in BACKENDS:
        pytest.skip("no cpp kernel here")
    use_backend("cpp")
    args = op_inputs("sam_sequence", torch.float32, B=3, N=9, W=5, R=2)
    eager, eager_grads = outputs_and_grads(sam_sequence, args)
    assert "SamSequence" in eager[0].grad_fn.name()
    registered, registered_grads = outputs_and_grads(torch.ops.sparsemem.sam_sequence, args)
    for a, b in zip((*eager, *eager_grads), (*registered, *registered_grads), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_no_grad_gives_the_same_values(use_backend):
    if "cpp" not in BACKENDS:
        pytest.skip("no cpp kernel here")
    use_backend("cpp")
    args = leaves(op_inputs("sam_sequence", torch.float32, B=3, N=9, W=5, R=2))
    with torch.no_grad():
        plain = sam_sequence(*args)
    for a, b in zip(plain, sam_sequence(*args), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_writes_every_output_element(backend, use_backend, nan_poisoned):
    use_backend(backend)
    args = op_inputs("sam_sequence", torch.float32, B=3, N=17, W=5, R=3)
    outputs, grads = outputs_and_grads(sam_sequence, args)
    for value in (*outputs, *grads):
        assert value.isfinite().all() if value.is_floating_point() else True
    assert ((outputs[5] >= 0) & (outputs[5] < 17)).all() and ((outputs[7] >= 0) & (outputs[7] < 17)).all()


def test_under_torch_compile():
    args = op_inputs("sam_sequence", torch.float64, B=2, N=6, W=3, R=2)
    compiled = torch.compile(sam_sequence, backend="aot_eager", fullgraph=True)
    got, got_grads = outputs_and_grads(compiled, args)
    want, want_grads = outputs_and_grads(sam_sequence_ref, args)
    for a, b in zip((*got, *got_grads), (*want, *want_grads), strict=True):
        torch.testing.assert_close(a, b, **tolerance(torch.float64))


def f64(*shape):
    return torch.zeros(*shape, dtype=torch.float64)


@pytest.mark.parametrize(
    ("replaced", "message"),
    [
        ({0: f64(0, 2, 20), 14: torch.ones(0, 2, dtype=torch.bool)}, "T, B >= 1"),
        ({0: f64(4, 2, 18)}, r"gates_x \[T, B, 4H\]"),
        ({3: f64(2, 6)}, r"reads must be \[B, R, W\]"),
        ({5: f64(2, 6)}, "last_access must be int64"),
        ({6: torch.zeros(2, 6, dtype=torch.int64)}, "written must be a bool mask"),
        ({9: torch.zeros(2, 8, dtype=torch.int64), 10: f64(2, 8)}, r"J = R\*K \+ 1 = 9"),
        ({11: f64(20, 5)}, r"weight_rh \[4H, R\*W \+ H\]"),
        ({12: f64(30, 5), 13: f64(30)}, r"I = R\*W \+ R \+ W \+ 2 = 13"),
        ({14: torch.ones(4, 3, dtype=torch.bool)}, r"active must be \[T, B\] with B=2"),
        ({4: torch.zeros(2, 6, 3)}, "memory is torch.float32"),
        ({15: -1}, "clock must be an int >= 0; got -1"),
        ({15: True}, "clock must be an int >= 0; got True"),
    ],
)
def test_bad_inputs_are_value_errors(replaced, message):
    args = list(op_inputs("sam_sequence", torch.float64, B=2, N=6, W=3, R=2))
    for position, bad in replaced.items():
        args[position] = bad
    with pytest.raises(ValueError, match=message):
        sam_sequence(*args)


def test_slots_out_of_range_are_errors(use_backend):
    if "cpp" not in BACKENDS:
        pytest.skip("no cpp kernel here")
    use_backend("cpp")
    args = list(op_inputs("sam_sequence", torch.float64, B=2, N=6, W=3, R=2))
    args[7] = args[7].clone()
    args[7][0, 0, 0] = 6
    with pytest.raises(RuntimeError, match=r"slots in \[0, N=6\)"):
        sam_sequence(*args)
