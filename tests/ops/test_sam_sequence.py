"""sam_sequence and sdnc_sequence, T steps of an LSTM-controlled SAM or SDNC in one op, each test for
both ops: every backend that runs here against the reference loop (outputs and gradients, odd sizes),
gradcheck, opcheck, the C++ node against the custom op, NaN-poisoned outputs, input checks and a
compile smoke test; for SDNC also that the test inputs reach the links, and a start from empty links.
The model that calls sam_sequence (models.SAM's forward) against its step loop is
tests/models/test_sam_sequence_model.py."""

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from sparsemem.ops.sam_sequence import sam_sequence, sdnc_sequence
from sparsemem.reference import sam_sequence_ref, sdnc_sequence_ref
from sparsemem.testing import op_inputs
from tests.conftest import cpu_backends
from tests.ops.sequences import leaves, outputs_and_grads
from tests.tolerances import tolerance


@dataclass(frozen=True)
class Op:
    """One of the two ops. Arguments are named, not numbered: sdnc_sequence puts its four link
    arguments between write_w and weight_rh. Outputs 0-9 are the same for both."""

    name: str
    call: Callable
    reference: Callable
    outputs: int
    masks: tuple[int, ...]  # the bool outputs: written_now, and SDNC's linked_now
    node: str  # the C++ autograd node an eager call takes

    def __str__(self) -> str:
        return self.name

    @property
    def backends(self) -> list[str]:
        return cpu_backends(self.name)

    def at(self, argument: str) -> int:
        return list(inspect.signature(self.call).parameters).index(argument)

    def inputs(self, dtype: torch.dtype, **replaced) -> list:
        """op_inputs at B=2, N=6, W=3, R=2 (K=4, K_L=3), small enough for gradcheck on the reference,
        with the named arguments replaced."""
        args = list(op_inputs(self.name, dtype, B=2, N=6, W=3, R=2))
        for argument, value in replaced.items():
            args[self.at(argument)] = value
        return args


SAM = Op("sam_sequence", sam_sequence, sam_sequence_ref, outputs=10, masks=(9,), node="SamSequence")
SDNC = Op("sdnc_sequence", sdnc_sequence, sdnc_sequence_ref, outputs=15, masks=(9, 14), node="SdncSequence")
OPS = [SAM, SDNC]
OP_BACKENDS = [pytest.param(op, backend, id=f"{op}-{backend}") for op in OPS for backend in op.backends]
SIZES = [dict(B=3, N=7, W=5, R=3), dict(B=1, N=33, W=3, R=1), dict(B=2, N=65, W=9, R=2)]


def needs_cpp(op: Op, use_backend) -> None:
    if "cpp" not in op.backends:
        pytest.skip(f"no cpp kernel for {op} here")
    use_backend("cpp")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(("op", "backend"), OP_BACKENDS)
def test_matches_reference(op, backend, size, dtype, use_backend):
    use_backend(backend)
    args = op_inputs(op.name, dtype, **size)
    got, got_grads = outputs_and_grads(op.call, args)
    want, want_grads = outputs_and_grads(op.reference, args)
    B, R, W = (size[letter] for letter in "BRW")
    assert len(got) == op.outputs and got[0].shape == (4, B, 5) and got[1].shape == (4, B, R, W)
    for i in op.masks:
        assert got[i].dtype == torch.bool and got[i].any(), "the op reports the slots it wrote (and links it changed)"
    for a, b in zip((*got, *got_grads), (*want, *want_grads), strict=True):
        torch.testing.assert_close(a, b, **tolerance(dtype))


@pytest.mark.parametrize("op", OPS, ids=str)
def test_the_inputs_exercise_the_step(op):
    """The test inputs reach every branch: padded rows, the LRU slot among the rows read, accesses
    stamped, and reads of unwritten slots (score 0) beside written ones."""
    args = op_inputs(op.name, torch.float64, B=3, N=7, W=5, R=3)
    out = op.reference(*args)
    active, clock, written = (args[op.at(argument)] for argument in ("active", "clock", "written"))
    assert not active.all() and active[0].all()
    assert (out[4] > clock).any(), "some slots were accessed"
    # weight > 0: SDNC's empty temporal places read slot 0 with weight 0
    unwritten = ~written.gather(-1, out[5].flatten(1)) & (out[6].flatten(1) > 0)
    assert unwritten.any(), "some reads landed on slots never written before"


def test_the_sdnc_inputs_exercise_the_links():
    """The temporal reads follow links both ways, and the link update changes rows: only rows that
    linked_now reports (the C++ kernel copies back only those)."""
    args = op_inputs("sdnc_sequence", torch.float64, B=3, N=7, W=5, R=3)
    out = sdnc_sequence_ref(*args)
    K = args[SDNC.at("read_w")].shape[-1] // 3
    read_w, linked_now = out[6], out[14]
    assert (read_w[..., :K] > 0).any() and (read_w[..., -K:] > 0).any(), "backward and forward reads"
    link_idx, link_w = args[SDNC.at("link_idx")], args[SDNC.at("link_w")]
    changed = ((out[10] != link_idx) | (out[11] != link_w)).any(-1)
    assert (changed & linked_now).any() and not (changed & ~linked_now).any()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", SDNC.backends)
def test_sdnc_from_empty_links_matches_reference(backend, dtype, use_backend):
    """From an empty link store and precedence (an episode's start) the temporal reads find fewer than
    K slots: empty places (slot 0, weight 0) in read_w, then in the next step's write weights.
    op_inputs' links are too dense to leave any."""
    use_backend(backend)
    args = list(op_inputs("sdnc_sequence", dtype, B=3, N=17, W=5, R=3))
    for indices, values in (("link_idx", "link_w"), ("precedence_idx", "precedence_w")):
        args[SDNC.at(indices)] = torch.full_like(args[SDNC.at(indices)], -1)
        args[SDNC.at(values)] = torch.zeros_like(args[SDNC.at(values)])
    got, got_grads = outputs_and_grads(sdnc_sequence, args)
    want, want_grads = outputs_and_grads(sdnc_sequence_ref, args)
    assert (want[6] == 0).any() and (want[8] == 0).any(), "empty places in the last step's reads and write"
    for a, b in zip((*got, *got_grads), (*want, *want_grads), strict=True):
        torch.testing.assert_close(a, b, **tolerance(dtype))


@pytest.mark.parametrize(("op", "backend"), OP_BACKENDS)
def test_gradcheck(op, backend, use_backend):
    use_backend(backend)
    args = leaves(op.inputs(torch.float64))
    # SDNC's reference loop takes ~10 ms a call: its full Jacobians (~1500 calls, 30-50 s) are checked
    # along random directions instead
    fast = op is SDNC and backend == "torch"
    assert torch.autograd.gradcheck(
        lambda *a: tuple(o for o in op.call(*a) if o.is_floating_point()), args, fast_mode=fast
    )


@pytest.mark.parametrize(("op", "backend"), OP_BACKENDS)
def test_opcheck(op, backend, use_backend):
    use_backend(backend)
    torch.library.opcheck(getattr(torch.ops.sparsemem, op.name).default, leaves(op.inputs(torch.float64)))


@pytest.mark.parametrize("op", OPS, ids=str)
def test_the_cpp_node_and_the_custom_op_agree_bit_for_bit(op, use_backend):
    """Eager calls take the C++ node, which keeps its forward's tape; the registered custom op
    (torch.compile, opcheck) runs the forward again in its backward. Same numbers either way."""
    needs_cpp(op, use_backend)
    args = op_inputs(op.name, torch.float32, B=3, N=9, W=5, R=2)
    eager, eager_grads = outputs_and_grads(op.call, args)
    assert op.node in eager[0].grad_fn.name()
    registered, registered_grads = outputs_and_grads(getattr(torch.ops.sparsemem, op.name), args)
    for a, b in zip((*eager, *eager_grads), (*registered, *registered_grads), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("op", OPS, ids=str)
def test_no_grad_gives_the_same_values(op, use_backend):
    needs_cpp(op, use_backend)
    args = leaves(op_inputs(op.name, torch.float32, B=3, N=9, W=5, R=2))
    with torch.no_grad():
        plain = op.call(*args)
    for a, b in zip(plain, op.call(*args), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(("op", "backend"), OP_BACKENDS)
def test_writes_every_output_element(op, backend, use_backend, nan_poisoned):
    use_backend(backend)
    args = op_inputs(op.name, torch.float32, B=3, N=17, W=5, R=3)
    outputs, grads = outputs_and_grads(op.call, args)
    for value in (*outputs, *grads):
        assert value.isfinite().all() if value.is_floating_point() else True
    for slots in outputs[5:8:2]:  # read_idx, write_idx
        assert ((slots >= 0) & (slots < 17)).all()
    for slots in outputs[10:13:2]:  # SDNC's link_idx, precedence_idx: -1 marks an empty place
        assert ((slots >= -1) & (slots < 17)).all()


@pytest.mark.parametrize("op", OPS, ids=str)
def test_under_torch_compile(op):
    args = op.inputs(torch.float64)
    compiled = torch.compile(op.call, backend="aot_eager", fullgraph=True)
    got, got_grads = outputs_and_grads(compiled, args)
    want, want_grads = outputs_and_grads(op.reference, args)
    for a, b in zip((*got, *got_grads), (*want, *want_grads), strict=True):
        torch.testing.assert_close(a, b, **tolerance(torch.float64))


def f64(*shape):
    return torch.zeros(*shape, dtype=torch.float64)


def i64(*shape):
    return torch.zeros(*shape, dtype=torch.int64)


BAD_INPUTS = {  # (replaced arguments, message) at Op.inputs' sizes
    "both": [
        (dict(gates_x=f64(0, 2, 20), active=torch.ones(0, 2, dtype=torch.bool)), "T, B >= 1"),
        (dict(gates_x=f64(4, 2, 18)), r"gates_x \[T, B, 4H\]"),
        (dict(reads=f64(2, 6)), r"reads must be \[B, R, W\]"),
        (dict(last_access=f64(2, 6)), "last_access must be int64"),
        (dict(written=i64(2, 6)), "written must be a bool mask"),
        (dict(weight_rh=f64(20, 5)), r"weight_rh \[4H, R\*W \+ H\]"),
        (dict(active=torch.ones(4, 3, dtype=torch.bool)), r"active must be \[T, B\] with B=2"),
        (dict(memory=torch.zeros(2, 6, 3)), "memory is torch.float32"),
        (dict(clock=-1), "clock must be an int >= 0; got -1"),
        (dict(clock=True), "clock must be an int >= 0; got True"),
    ],
    "sam_sequence": [
        (dict(write_idx=i64(2, 8), write_w=f64(2, 8)), r"J = R\*K \+ 1 = 9"),
        (dict(weight_if=f64(30, 5), bias_if=f64(30)), r"I = R\*W \+ R \+ W \+ 2 = 13"),
    ],
    "sdnc_sequence": [
        (dict(write_idx=i64(2, 24), write_w=f64(2, 24)), r"J = R\*3K \+ 1 = 25"),
        (dict(weight_if=f64(30, 5), bias_if=f64(30)), r"I = R\*W \+ R \+ W \+ 2 \+ 3R = 19"),
        # 4 read places per head are no three thirds, though J = R*4 + 1 fits them
        (dict(read_idx=i64(2, 2, 4), read_w=f64(2, 2, 4), write_idx=i64(2, 9), write_w=f64(2, 9)), r"3K=4\)"),
        (dict(link_w=f64(2, 6, 3)), r"link_w must be \[B, 2N, K_L\] with 2N=12"),
        (dict(link_idx=i64(2, 6, 3), link_w=f64(2, 6, 3)), r"link rows \[B, 2N, K_L\] \(N=6\)"),
        (
            dict(link_idx=i64(2, 12, 0), link_w=f64(2, 12, 0), precedence_idx=i64(2, 0), precedence_w=f64(2, 0)),
            r"link_idx must be \[B, 2N, K_L\] with K_L >= 1; got \[2, 12, 0\]",
        ),
        (dict(precedence_idx=f64(2, 3)), "precedence_idx must be int64"),
    ],
}


@pytest.mark.parametrize(
    ("op", "replaced", "message"),
    [
        pytest.param(op, replaced, message, id=f"{op}-{'-'.join(replaced)}")
        for op in OPS
        for replaced, message in BAD_INPUTS["both"] + BAD_INPUTS[op.name]
    ],
)
def test_bad_inputs_are_value_errors(op, replaced, message):
    with pytest.raises(ValueError, match=message):
        op.call(*op.inputs(torch.float64, **replaced))


@pytest.mark.parametrize("op", OPS, ids=str)
def test_slots_out_of_range_are_errors(op, use_backend):
    needs_cpp(op, use_backend)
    args, position = op.inputs(torch.float64), op.at("read_idx")
    args[position] = args[position].clone()
    args[position][0, 0, 0] = 6
    with pytest.raises(RuntimeError, match=r"slots in \[0, N=6\)"):
        op.call(*args)
