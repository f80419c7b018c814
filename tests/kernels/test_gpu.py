"""Triton and CUDA backends on a GPU against the reference: odd sizes, hard usages, gradcheck, opcheck.

Marked `gpu`: skipped without a CUDA device. Run on the device machine with
`pytest -m gpu tests/kernels/test_gpu.py` (and under compute-sanitizer for memcheck).
"""

import pytest
import torch

import sparsemem as sm
from sparsemem import _backends, reference
from sparsemem.testing import DENSE_KERNEL_OPS, QUADRATIC_OPS, op_inputs
from tests.kernels.inputs import hard_usages, link_update_inputs, temporal_reads_inputs
from tests.tolerances import tolerance

pytestmark = pytest.mark.gpu


def gpu_cases() -> list[tuple[str, str]]:
    backends = ("triton", "cuda")
    return [(op, backend) for op in DENSE_KERNEL_OPS for backend in backends if backend in _backends._KERNELS[op]]


SPARSE_LINK_OPS = ("sparse_link_update", "sparse_temporal_reads")


def sparse_link_cases() -> list[tuple[str, str]]:
    backends = ("triton", "cuda")
    return [(op, backend) for op in SPARSE_LINK_OPS for backend in backends if backend in _backends._KERNELS[op]]


def _as_tuple(value):
    return value if isinstance(value, tuple) else (value,)


def _cuda(args, requires_grad=False):
    return tuple(
        a.cuda().requires_grad_(requires_grad and a.is_floating_point()) if isinstance(a, torch.Tensor) else a
        for a in args
    )


@pytest.fixture(autouse=True)
def nan_poisoned_cache():
    """Fill the caching allocator's free memory with NaN so an output element no kernel writes shows.

    Both backends allocate outputs with torch.empty / at::empty from this cache.
    """
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        poison = torch.full((2**27,), float("nan"), device="cuda")
        del poison


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("N", [1, 7, 33, 1000, 4097])
@pytest.mark.parametrize(("op", "backend"), gpu_cases())
def test_matches_reference_on_gpu(op, backend, N, dtype, use_backend):
    if op in QUADRATIC_OPS and N > 1000:
        pytest.skip("N x N links: N <= 1000 here, larger in bench/")
    use_backend(backend)
    args = _cuda(op_inputs(op, dtype, B=3, N=N, W=9, R=3))
    expected = _as_tuple(getattr(reference, f"{op}_ref")(*args))
    actual = _as_tuple(getattr(sm.ops, op)(*args))
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want, **tolerance(dtype, reduced_over=N))


@pytest.mark.parametrize(("op", "backend"), gpu_cases())
def test_gradients_match_reference_on_gpu(op, backend, use_backend):
    use_backend(backend)
    args = _cuda(op_inputs(op, torch.float64, B=3, N=257, W=9, R=3), requires_grad=True)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    outputs = _as_tuple(getattr(sm.ops, op)(*args))
    seeds = [torch.randn_like(o) for o in outputs]
    got = torch.autograd.grad(outputs, leaves, seeds)
    want = torch.autograd.grad(_as_tuple(getattr(reference, f"{op}_ref")(*args)), leaves, seeds)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **tolerance(torch.float64))


@pytest.mark.parametrize(("op", "backend"), gpu_cases())
def test_gradcheck_and_opcheck_on_gpu(op, backend, use_backend):
    use_backend(backend)
    args = _cuda(op_inputs(op, torch.float64, B=2, N=13, W=4, R=2), requires_grad=True)
    assert torch.autograd.gradcheck(getattr(sm.ops, op), args)
    torch.library.opcheck(getattr(torch.ops.sparsemem, op).default, args)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize(("N", "dtype"), [(4097, torch.float64), (2**20, torch.float32)])
def test_allocation_with_zeros_ones_and_ties_on_gpu(backend, N, dtype, use_backend):
    if backend not in _backends._KERNELS["allocation_weights"]:
        pytest.skip(f"no {backend} allocation kernel")
    use_backend(backend)
    usage = hard_usages(8, N, dtype).cuda().requires_grad_(True)
    seed = torch.randn_like(usage)
    got = sm.ops.allocation_weights(usage)
    (grad,) = torch.autograd.grad(got, usage, seed)
    want = reference.allocation_weights_ref(usage)
    (want_grad,) = torch.autograd.grad(want, usage, seed)
    torch.testing.assert_close(got, want, **tolerance(dtype, reduced_over=N))
    assert grad.isfinite().all()
    torch.testing.assert_close(grad, want_grad, **tolerance(dtype, reduced_over=N))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_content_read_at_scale_on_gpu(backend, use_backend):
    if backend not in _backends._KERNELS["content_read"]:
        pytest.skip(f"no {backend} content kernel")
    use_backend(backend)
    memory, keys, strengths = _cuda(op_inputs("content_read", torch.float32, B=8, N=2**16, W=64, R=4))
    for got, want in zip(
        sm.ops.content_read(memory, keys, strengths * 20),
        reference.content_read_ref(memory, keys, strengths * 20),
        strict=True,
    ):
        torch.testing.assert_close(got, want, **tolerance(torch.float32, reduced_over=2**16))


def _assert_link_outputs(actual, expected, dtype, exact=False):
    for got, want in zip(actual, expected, strict=True):
        if want.is_floating_point() and not exact:
            torch.testing.assert_close(got, want, **tolerance(dtype))
        else:
            assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("N", [7, 33, 257])
@pytest.mark.parametrize(("op", "backend"), sparse_link_cases())
def test_sparse_links_match_reference_on_gpu(op, backend, N, dtype, use_backend):
    use_backend(backend)
    args = _cuda(op_inputs(op, dtype, B=3, N=N, W=9, R=3))
    expected = getattr(reference, f"{op}_ref")(*args)
    _assert_link_outputs(getattr(sm.ops, op)(*args), expected, dtype)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("op", "backend"), sparse_link_cases())
def test_sparse_links_at_sdnc_sizes_on_gpu(op, backend, dtype, ties, use_backend):
    """An SDNC step's sizes (K_L = 8, J = R K + 1 = 33 writes, Q = 3K = 24 read slots a head),
    with gradients; with ties (binary fractions), outputs bit-equal to the reference's."""
    use_backend(backend)
    if op == "sparse_link_update":
        args = _cuda(link_update_inputs(8, 301, 8, 33, dtype, seed=1, ties=ties), requires_grad=True)
    else:
        args = (*_cuda(temporal_reads_inputs(8, 301, 4, 24, 8, dtype, seed=1, ties=ties), requires_grad=True), 8)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    actual = getattr(sm.ops, op)(*args)
    expected = getattr(reference, f"{op}_ref")(*args)
    _assert_link_outputs(actual, expected, dtype, exact=ties)
    got_floats = [o for o in actual if o.is_floating_point()]
    seeds = [torch.randn_like(o) for o in got_floats]
    got = torch.autograd.grad(got_floats, leaves, seeds)
    want = torch.autograd.grad([o for o in expected if o.is_floating_point()], leaves, seeds)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **tolerance(dtype))


@pytest.mark.parametrize(("op", "backend"), sparse_link_cases())
def test_sparse_links_gradcheck_and_opcheck_on_gpu(op, backend, use_backend):
    use_backend(backend)
    args = _cuda(op_inputs(op, torch.float64, B=2, N=6, W=4, R=2), requires_grad=True)

    def float_outputs(*inputs):
        return tuple(o for o in getattr(sm.ops, op)(*inputs) if o.is_floating_point())

    assert torch.autograd.gradcheck(float_outputs, args)
    torch.library.opcheck(getattr(torch.ops.sparsemem, op).default, args)
