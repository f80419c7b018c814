"""The fast kernels of topk_content beyond the generic op tests (tests/ops/test_registered_ops.py):
odd sizes with K in {1, 8}, slots spread over several of the kernels' chunks, the tie order,
K = N, and outputs that start as NaN."""

import pytest
import torch

import sparsemem as sm
from sparsemem.reference.dnc import cosine_similarity_ref
from tests.conftest import cpu_backends, run_backward
from tests.tolerances import tolerance

BACKENDS = [backend for backend in cpu_backends("topk_content") if backend != "torch"]
DTYPES = [torch.float64, torch.float32]

if not BACKENDS:
    pytest.skip("no fast backend implements topk_content here", allow_module_level=True)


def distinct_memory(B: int, N: int, W: int, dtype: torch.dtype, top: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Memory and keys (R = 3) whose `top` best cosine scores differ by far more than float32 rounding."""
    g = torch.Generator().manual_seed(seed)
    memory = torch.randn(B, N, W, generator=g, dtype=torch.float64)
    keys = torch.randn(B, 3, W, generator=g, dtype=torch.float64)
    best = torch.topk(cosine_similarity_ref(memory, keys), min(top + 1, N), dim=-1).values
    assert (best.diff(dim=-1) < -1e-6).all(), "pick another seed: near-tied scores"
    return memory.to(dtype), keys.to(dtype)


def many_slots(backend: str) -> int:
    """N spanning several tiles and programs: three of the C++ kernel's 8192-slot chunks; for the
    (interpreted) triton kernel 1001, eight 128-slot tiles over four programs per batch row."""
    return 20001 if backend == "cpp" else 1001


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 8])
@pytest.mark.parametrize("many", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
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


@pytest.mark.parametrize("backend", cpu_backends("topk_content"))  # the torch reference too
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
@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_content_with_k_equal_n_sorts_every_slot(backend, dtype, use_backend):
    use_backend(backend)
    memory, keys = distinct_memory(3, 13, 5, dtype, top=13, seed=2)
    scores, indices = sm.ops.topk_content(memory, keys, 13)
    want_scores, want_indices = torch.sort(cosine_similarity_ref(memory, keys), dim=-1, descending=True)
    assert torch.equal(indices, want_indices)
    torch.testing.assert_close(scores, want_scores, **tolerance(dtype))
