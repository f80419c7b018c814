"""Value checks of the ops whose inputs other ops already check (tests/test_validation.py has the
rest): NaN or inf weights and precedences, usage outside [0, 1]. Like every value check they run on
CPU tensors (on a GPU only with SPARSEMEM_DEBUG=1, so the GPU step never waits on the host)."""

import pytest
import torch

import sparsemem as sm
from sparsemem import _checks
from sparsemem.testing import op_inputs

NAN = float("nan")


def _poisoned(op: str, position: int, value: float = NAN) -> list:
    args = list(op_inputs(op))
    args[position] = args[position].clone()
    args[position].view(-1)[1] = value
    return args


@pytest.mark.parametrize(
    ("op", "position", "name"),
    [
        ("usage_update", 1, "write_w"),
        ("usage_update", 2, "read_w"),
        ("link_update", 1, "precedence"),
        ("link_update_reads", 1, "precedence"),
        ("sparse_link_update", 7, "precedence_values"),
    ],
)
@pytest.mark.parametrize("value", [NAN, float("inf")])
def test_non_finite_input_is_named(op, position, name, value):
    with pytest.raises(ValueError, match=f"^{name} contains NaN or inf$"):
        getattr(sm.ops, op)(*_poisoned(op, position, value))


@pytest.mark.parametrize("value", [1.5, -0.25, NAN])
def test_allocation_refuses_usage_outside_0_1(value):
    (usage,) = _poisoned("allocation_weights", 0, value)
    message = "usage contains NaN or inf" if value != value else r"usage must lie in \[0.0, 1.0\]"
    with pytest.raises(ValueError, match=message):
        sm.ops.allocation_weights(usage)


def test_usage_at_the_bounds_is_accepted():
    usage = torch.tensor([[0.0, 1.0, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(sm.ops.allocation_weights(usage), sm.reference.allocation_weights_ref(usage))


def test_value_checks_are_gated_like_the_others(monkeypatch):
    # off the host (a GPU) and without SPARSEMEM_DEBUG=1 no value is read: the op runs on the bad input
    monkeypatch.setattr(_checks, "_values_checked", lambda tensor: False)
    for op, position in (("usage_update", 1), ("link_update", 1), ("sparse_link_update", 7)):
        getattr(sm.ops, op)(*_poisoned(op, position))
    sm.ops.allocation_weights(*_poisoned("allocation_weights", 0, 1.5))
