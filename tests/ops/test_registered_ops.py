"""Every registered op, every backend that runs here: reference match, gradcheck, opcheck."""

import pytest
import torch

import sparsemem as sm
from sparsemem import reference
from sparsemem.testing import OPS, op_inputs
from tests.conftest import cpu_backends
from tests.tolerances import tolerance


def _as_tuple(value):
    return value if isinstance(value, tuple) else (value,)


def _differentiable(args):
    return tuple(
        arg.detach().requires_grad_(True) if isinstance(arg, torch.Tensor) and arg.is_floating_point() else arg
        for arg in args
    )


BACKEND_CASES = [(op, backend) for op in OPS for backend in cpu_backends(op)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("size", [dict(B=3, N=7, W=5, R=3), dict(B=1, N=33, W=3, R=1), dict(B=2, N=1000, W=9, R=3)])
@pytest.mark.parametrize(("op", "backend"), BACKEND_CASES)
def test_matches_reference(op, backend, size, dtype, use_backend):
    if backend == "triton" and op in ("link_update", "temporal_reads", "link_update_reads") and size["N"] > 100:
        pytest.skip("interpreted triton takes ~30 s for N x N at N = 1000; N = 33 covers partial tiles")
    if backend == "triton" and op == "sparse_link_update" and size["N"] > 100:
        # its mutual cut compares each entry with every gathered row of the other store (1002 here)
        pytest.skip("interpreted triton takes ~15 s at N = 1000; tests/ops/test_sparse_links.py covers blocks")
    use_backend(backend)
    args = op_inputs(op, dtype, **size)
    expected = _as_tuple(getattr(reference, f"{op}_ref")(*args))
    actual = _as_tuple(getattr(sm.ops, op)(*args))
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want, **tolerance(dtype))


@pytest.mark.parametrize(("op", "backend"), BACKEND_CASES)
def test_gradients_match_reference(op, backend, use_backend):
    use_backend(backend)
    args = _differentiable(op_inputs(op, torch.float64, B=3, N=11, W=5, R=3))
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    outputs = [o for o in _as_tuple(getattr(sm.ops, op)(*args)) if o.is_floating_point()]
    seeds = [torch.randn_like(o) for o in outputs]
    got = torch.autograd.grad(outputs, leaves, seeds)
    expected_outputs = [o for o in _as_tuple(getattr(reference, f"{op}_ref")(*args)) if o.is_floating_point()]
    want = torch.autograd.grad(expected_outputs, leaves, seeds)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **tolerance(torch.float64))


@pytest.mark.parametrize(("op", "backend"), BACKEND_CASES)
def test_gradcheck(op, backend, use_backend):
    use_backend(backend)
    args = _differentiable(op_inputs(op, torch.float64, B=2, N=6, W=4, R=2))

    # interpreted triton pays ~0.1 s a launch: check random projections of the Jacobian (fast_mode)
    # instead of every column; test_gradients_match_reference compares full vjps
    def float_outputs(*inputs):  # gradcheck pairs outputs with Jacobians by position: no index outputs
        return tuple(out for out in _as_tuple(getattr(sm.ops, op)(*inputs)) if out.is_floating_point())

    assert torch.autograd.gradcheck(float_outputs, args, fast_mode=backend == "triton")


@pytest.mark.parametrize(("op", "backend"), BACKEND_CASES)
def test_opcheck(op, backend, use_backend):
    use_backend(backend)
    args = _differentiable(op_inputs(op, torch.float64, B=2, N=6, W=4, R=2))
    torch.library.opcheck(getattr(torch.ops.sparsemem, op).default, args)


@pytest.mark.parametrize(("op", "backend"), BACKEND_CASES)
def test_bfloat16_close_to_float64(op, backend, use_backend):
    use_backend(backend)
    if op == "topk_content":
        pytest.skip("bf16 rounding reorders near-equal scores; the indices are compared in float32")
    args16 = tuple(
        a.to(torch.bfloat16) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
        for a in op_inputs(op, torch.float64, B=2, N=9, W=4, R=2)
    )
    # the float64 answer on the same (bf16-rounded) inputs, so only the op's own rounding is measured
    args64 = tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args16)
    for got, want in zip(_as_tuple(getattr(sm.ops, op)(*args16)), _as_tuple(getattr(sm.ops, op)(*args64)), strict=True):
        assert got.dtype == (torch.bfloat16 if want.is_floating_point() else want.dtype)
        torch.testing.assert_close(got.double(), want.double(), **tolerance(torch.bfloat16))


DIFFERENTIATED_IN_CPP = ("dnc_write", "dnc_read", "link_update_reads", "sparse_read", "ntm_address")
"""The ops whose cpp kernels register their autograd in C++ (csrc/cpu/autograd.h)."""


@pytest.mark.parametrize("op", DIFFERENTIATED_IN_CPP)
def test_the_cpp_backend_records_one_cpp_node(op, use_backend):
    """An eager call on the cpp backend goes straight to the ext op and its C++ node; elsewhere
    ops/_define.py's autograd.Function records the node."""
    if "cpp" not in cpu_backends(op):
        pytest.skip("no cpp kernel here")

    def node() -> str:
        leaves = _differentiable(op_inputs(op, torch.float64))
        return _as_tuple(getattr(sm.ops, op)(*leaves))[0].grad_fn.name()

    use_backend("cpp")
    assert node().startswith("torch::autograd::CppNode"), node()
    use_backend("torch")
    assert node() == f"sparsemem_{op}Backward"


@pytest.mark.parametrize("op", DIFFERENTIATED_IN_CPP)
def test_cpp_and_python_autograd_give_the_same_gradients(op, use_backend):
    """The C++ node and the custom op (its autograd.Function, what torch.compile and opcheck use)
    around the same cpp kernel agree bit for bit."""
    if "cpp" not in cpu_backends(op):
        pytest.skip("no cpp kernel here")
    use_backend("cpp")
    args = op_inputs(op, torch.float32, B=3, N=9, W=5, R=2)
    grads = []
    for call in (getattr(sm.ops, op), getattr(torch.ops.sparsemem, op)):
        leaves = _differentiable(args)
        outputs = [o for o in _as_tuple(call(*leaves)) if o.is_floating_point()]
        seeds = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)) for i, o in enumerate(outputs)]
        grads.append(torch.autograd.grad(outputs, [a for a in leaves if a.requires_grad], seeds, allow_unused=True))
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
