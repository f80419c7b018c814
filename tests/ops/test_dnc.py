"""dnc_write and dnc_read on the CPU: eager calls on the cpp backend are differentiated in C++
(csrc/cpu/dnc.cpp registers their autograd), the other backends through ops/_define.py's
autograd.Function; the op matrix (test_registered_ops.py) checks both against the reference."""

import pytest
import torch

import sparsemem as sm
from sparsemem.testing import op_inputs

CPP_UNAVAILABLE = sm.backends_for("dnc_write", "cpu").unavailable.get("cpp")
pytestmark = pytest.mark.skipif(CPP_UNAVAILABLE is not None, reason=str(CPP_UNAVAILABLE))


def _node(op: str) -> str:
    leaves = [x.requires_grad_(True) for x in op_inputs(op, torch.float64)]
    return getattr(sm.ops, op)(*leaves)[0].grad_fn.name()


@pytest.mark.parametrize(("op", "cpp_node"), [("dnc_write", "DncWrite"), ("dnc_read", "DncRead")])
def test_the_cpp_backend_records_one_cpp_node(op, cpp_node, use_backend):
    use_backend("cpp")
    assert cpp_node in _node(op)
    use_backend("torch")
    assert _node(op) == f"sparsemem_{op}Backward"  # the autograd.Function's


@pytest.mark.parametrize("op", ["dnc_write", "dnc_read"])
def test_cpp_and_python_autograd_give_the_same_gradients(op, use_backend):
    """The C++ node and the autograd.Function around the same cpp kernel (what torch.compile and
    opcheck use: the registered custom op) agree bit for bit."""
    use_backend("cpp")
    args = op_inputs(op, torch.float32, B=3, N=9, W=5, R=2)
    seeds = None
    grads = []
    for call in (getattr(sm.ops, op), getattr(torch.ops.sparsemem, op)):
        leaves = [x.clone().requires_grad_(True) for x in args]
        outputs = call(*leaves)
        seeds = seeds or [
            torch.randn(o.shape, generator=torch.Generator().manual_seed(i)) for i, o in enumerate(outputs)
        ]
        grads.append(torch.autograd.grad(outputs, leaves, seeds))
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
