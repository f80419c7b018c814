"""The fast sparse kernels (topk_content, sparse_read, sparse_write) beyond the generic op tests
(tests/ops/test_registered_ops.py): odd sizes with K in {1, 8}, slots spread over several of the
kernels' chunks, repeated slots, the tie order, K = N against the dense content read, and outputs
that start as NaN."""

import pytest
import torch

import sparsemem as sm
from sparsemem import reference
from sparsemem.reference.dnc import cosine_similarity_ref
from sparsemem.testing import op_inputs
from tests.conftest import cpu_backends
from tests.tolerances import tolerance

SPARSE_OPS = ("topk_content", "sparse_read", "sparse_write")
CASES = [(op, backend) for op in SPARSE_OPS for backend in cpu_backends(op) if backend != "torch"]
DTYPES = [torch.float64, torch.float32]

if not CASES:
    pytest.skip("no fast backend implements the sparse ops here", allow_module_level=True)


def backends_of(op: str) -> list[str]:
    return [backend for name, backend in CASES if name == op]


def distinct_memory(B: int, N: int, W: int, dtype: torch.dtype, top: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Memory and keys (R = 3) whose `top` best cosine scores differ by far more than float32 rounding."""
    g = torch.Generator().manual_seed(seed)
    memory = torch.randn(B, N, W, generator=g, dtype=torch.float64)
    keys = torch.randn(B, 3, W, generator=g, dtype=torch.float64)
    best = torch.topk(cosine_similarity_ref(memory, keys), min(top + 1, N), dim=-1).values
    assert (best.diff(dim=-1) < -1e-6).all(), "pick another seed: near-tied scores"
    return memory.to(dtype), keys.to(dtype)


@pytest.fixture
def nan_poisoned():
    """Every tensor torch allocates uninitialised (at::empty in the C++ kernels, torch.empty in the
    triton wrappers) starts as NaN, so an element no kernel writes shows: torch fills uninitialised
    memory when deterministic algorithms are on."""
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    assert torch.empty(4).isnan().all(), "the poisoning these tests rely on is off"
    yield
    torch.use_deterministic_algorithms(False)


def run_backward(outputs, leaves):
    outputs = [o for o in outputs if o.is_floating_point()]
    seeds = [torch.randn(o.shape, generator=torch.Generator().manual_seed(1), dtype=o.dtype) for o in outputs]
    return torch.autograd.grad(outputs, leaves, seeds), seeds


def many_slots(backend: str) -> int:
    """N spanning several tiles and programs: three of the C++ kernel's 8192-slot chunks; for the
    (interpreted) triton kernel 1001, eight 128-slot tiles over four programs per batch row."""
    return 20001 if backend == "cpp" else 1001


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 8])
@pytest.mark.parametrize("many", [False, True])
@pytest.mark.parametrize("backend", backends_of("topk_content"))
def test_topk_content_equals_torch_topk(backend, many, k, dtype, use_backend, nan_poisoned):
    use_backend(backend)
    N = many_slots(backend) if many else 37
    memory, keys = distinct_memory(3, N, 6, dtype, top=k)
    memory.requires_grad_(True)
    keys.requires_grad_(True)
    want_scores, want_indices = torch.topk(cosine_similarity_ref(memory, keys), k, dim=-1)
    scores, indices = sm.ops.topk_content(memory, keys, k)
    assert torch.equal(indices, want_indices)
    torch.testing.assert_close(scores, want_scores, **tolerance(dtype))
    got, seeds = run_backward((scores,), (memory, keys))
    want = torch.autograd.grad(want_scores, (memory, keys), seeds)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **tolerance(dtype))


@pytest.mark.parametrize("backend", backends_of("topk_content"))
def test_topk_content_ties_go_to_the_lower_slot(backend, use_backend):
    use_backend(backend)
    # six slots, in different tiles and chunks, hold the same word: equal scores, in slot order
    N = many_slots(backend)
    g = torch.Generator().manual_seed(0)
    memory = torch.randn(2, N, 4, generator=g, dtype=torch.float64)
    keys = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    tied = [2, 5, 9, 14, N // 2, N - 2]
    for slot in reversed(tied):
        memory[:, slot] = keys[:, 0] * 2
    _, indices = sm.ops.topk_content(memory, keys, 6)
    assert indices[:, 0].tolist() == [tied] * 2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", backends_of("topk_content"))
def test_topk_content_with_k_equal_n_sorts_every_slot(backend, dtype, use_backend):
    use_backend(backend)
    memory, keys = distinct_memory(3, 13, 5, dtype, top=13, seed=2)
    scores, indices = sm.ops.topk_content(memory, keys, 13)
    want_scores, want_indices = torch.sort(cosine_similarity_ref(memory, keys), dim=-1, descending=True)
    assert torch.equal(indices, want_indices)
    torch.testing.assert_close(scores, want_scores, **tolerance(dtype))


def sparse_read_inputs(B, N, W, R, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    memory = torch.randn(B, N, W, generator=g, dtype=dtype)
    # repeated slots within and across heads: their gradients must add up
    indices = torch.randint(0, N, (B, R, k), generator=g)
    keys = torch.randn(B, R, W, generator=g, dtype=dtype)
    strengths = torch.rand(B, R, generator=g, dtype=dtype) * 10
    return memory, indices, keys, strengths


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 8])
@pytest.mark.parametrize("N", [11, 1000])
@pytest.mark.parametrize("backend", backends_of("sparse_read"))
def test_sparse_read_matches_reference(backend, N, k, dtype, use_backend, nan_poisoned):
    use_backend(backend)
    memory, indices, keys, strengths = sparse_read_inputs(3, N, 7, 3, k, dtype)
    leaves = [t.requires_grad_(True) for t in (memory, keys, strengths)]
    want = reference.sparse_read_ref(memory, indices, keys, strengths)
    got = sm.ops.sparse_read(memory, indices, keys, strengths)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **tolerance(dtype))
    got_grads, seeds = run_backward(got, leaves)
    want_grads = torch.autograd.grad(want, leaves, seeds)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", backends_of("sparse_read"))
def test_sparse_read_over_every_slot_equals_content_read(backend, dtype, use_backend):
    use_backend(backend)
    memory, keys, strengths = op_inputs("content_read", dtype, B=3, N=13, W=5, R=3)
    every_slot = torch.arange(13).expand(3, 3, 13)
    got = sm.ops.sparse_read(memory, every_slot, keys, strengths)
    for g, w in zip(got, reference.content_read_ref(memory, keys, strengths), strict=True):
        torch.testing.assert_close(g, w, **tolerance(dtype))


@pytest.mark.parametrize("k", [1, 8])
@pytest.mark.parametrize("backend", backends_of("sparse_read"))
def test_sparse_read_gradcheck(backend, k, use_backend):
    use_backend(backend)
    memory, indices, keys, strengths = sparse_read_inputs(2, 9, 4, 3, k, torch.float64, seed=3)
    args = (memory.requires_grad_(True), indices, keys.requires_grad_(True), strengths.requires_grad_(True))
    assert torch.autograd.gradcheck(sm.ops.sparse_read, args, fast_mode=backend == "triton")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("J", [1, 33])
@pytest.mark.parametrize("backend", backends_of("sparse_write"))
def test_sparse_write_matches_reference(backend, J, dtype, use_backend, nan_poisoned):
    use_backend(backend)
    g = torch.Generator().manual_seed(J)
    rows = torch.randn(3, J, 7, generator=g, dtype=dtype, requires_grad=True)
    weights = torch.rand(3, J, generator=g, dtype=dtype, requires_grad=True)
    add = torch.randn(3, 7, generator=g, dtype=dtype, requires_grad=True)
    erase_rows = torch.rand(3, J, generator=g) < 0.3
    want = reference.sparse_write_ref(rows, weights, add, erase_rows)
    got = sm.ops.sparse_write(rows, weights, add, erase_rows)
    torch.testing.assert_close(got, want, **tolerance(dtype))
    got_grads, seeds = run_backward((got,), (rows, weights, add))
    want_grads = torch.autograd.grad(want, (rows, weights, add), seeds)
    for g_, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g_, w, **tolerance(dtype))
