"""Triton and CUDA backends on a GPU against the reference: odd sizes, hard usages, gradcheck, opcheck;
for the sparse ops also the C++ kernel on the CPU (same algorithm, so the same indices and ties).

Marked `gpu`: skipped without a CUDA device. Run on the device machine with
`pytest -m gpu tests/kernels/test_gpu.py` (and under compute-sanitizer for memcheck).
"""

import pytest
import torch

import sparsemem as sm
from sparsemem import _backends, reference
from sparsemem.memory import SAMMemory, SDNCMemory
from sparsemem.reference.dnc import cosine_similarity_ref
from sparsemem.testing import DENSE_KERNEL_OPS, QUADRATIC_OPS, SPARSE_KERNEL_OPS, op_inputs
from tests.kernels.inputs import hard_usages, link_update_inputs, temporal_reads_inputs
from tests.tolerances import tolerance

pytestmark = pytest.mark.gpu


def gpu_cases() -> list[tuple[str, str]]:
    backends = ("triton", "cuda")
    return [
        (op, backend) for op in DENSE_KERNEL_OPS for backend in backends if backend in _backends.implementations(op)
    ]


SPARSE_LINK_OPS = ("sparse_link_update", "sparse_temporal_reads")


def sparse_link_cases() -> list[tuple[str, str]]:
    backends = ("triton", "cuda")
    return [(op, backend) for op in SPARSE_LINK_OPS for backend in backends if backend in _backends.implementations(op)]


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
    if backend not in _backends.implementations("allocation_weights"):
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
    if backend not in _backends.implementations("content_read"):
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


# --- the sparse ops: topk_content, sparse_read, sparse_write, sparse_link_update, sparse_temporal_reads

# (the link ops against the reference, gradients and gradcheck: test_sparse_links_* above)
SAM_OPS = tuple(op for op in SPARSE_KERNEL_OPS if op not in SPARSE_LINK_OPS)


def sparse_gpu_cases() -> list[tuple[str, str]]:
    backends = ("triton", "cuda")
    return [(op, backend) for op in SAM_OPS for backend in backends if backend in _backends.implementations(op)]


def cuda_backend(op: str) -> None:
    if "cuda" not in _backends.implementations(op):
        pytest.skip(f"no cuda kernel for {op} (sparsemem._C built without CUDA)")


def _float_outputs(op):
    def run(*inputs):  # gradcheck pairs outputs with Jacobians by position: no index outputs
        return tuple(out for out in _as_tuple(getattr(sm.ops, op)(*inputs)) if out.is_floating_point())

    return run


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("N", [1, 7, 33, 1000, 4097])
@pytest.mark.parametrize(("op", "backend"), sparse_gpu_cases())
def test_sparse_ops_match_reference_on_gpu(op, backend, N, dtype, use_backend):
    use_backend(backend)
    args = _cuda(op_inputs(op, dtype, B=3, N=N, W=9, R=3))
    expected = _as_tuple(getattr(reference, f"{op}_ref")(*args))
    actual = _as_tuple(getattr(sm.ops, op)(*args))
    for got, want in zip(actual, expected, strict=True):
        assert got.device.type == "cuda"
        torch.testing.assert_close(got, want, **tolerance(dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("N", [7, 33, 300])
@pytest.mark.parametrize("op", SPARSE_KERNEL_OPS)
def test_sparse_cuda_kernels_match_the_cpp_kernels(op, N, dtype, use_backend):
    # The same algorithm on both: equal indices (ties included: the link ops' values are rounded
    # step by step on both, without FMA contraction) and values within the tolerance.
    cuda_backend(op)
    if "cpp" not in _backends.implementations(op):
        pytest.skip("no cpp kernel here")
    args = op_inputs(op, dtype, B=3, N=N, W=9, R=3)
    use_backend("cpp")
    want = _as_tuple(getattr(sm.ops, op)(*args))
    use_backend("cuda")
    got = _as_tuple(getattr(sm.ops, op)(*_cuda(args)))
    for g, w in zip(got, want, strict=True):
        if w.is_floating_point():
            torch.testing.assert_close(g.cpu(), w, **tolerance(dtype))
        else:
            assert torch.equal(g.cpu(), w)


@pytest.mark.parametrize(("op", "backend"), sparse_gpu_cases())
def test_sparse_gradients_match_reference_on_gpu(op, backend, use_backend):
    use_backend(backend)
    args = _cuda(op_inputs(op, torch.float64, B=3, N=257, W=9, R=3), requires_grad=True)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    outputs = _float_outputs(op)(*args)
    seeds = [torch.randn_like(o) for o in outputs]
    got = torch.autograd.grad(outputs, leaves, seeds)
    want_outputs = [o for o in _as_tuple(getattr(reference, f"{op}_ref")(*args)) if o.is_floating_point()]
    want = torch.autograd.grad(want_outputs, leaves, seeds)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **tolerance(torch.float64))


@pytest.mark.parametrize(("op", "backend"), sparse_gpu_cases())
def test_sparse_gradcheck_and_opcheck_on_gpu(op, backend, use_backend):
    use_backend(backend)
    args = _cuda(op_inputs(op, torch.float64, B=2, N=13, W=4, R=2), requires_grad=True)
    assert torch.autograd.gradcheck(_float_outputs(op), args)
    torch.library.opcheck(getattr(torch.ops.sparsemem, op).default, args)


@pytest.mark.parametrize("op", [op for op in SPARSE_KERNEL_OPS if op != "topk_content"])
def test_sparse_bfloat16_close_to_float64_on_gpu(op, use_backend):
    cuda_backend(op)
    use_backend("cuda")
    args16 = tuple(
        a.to(torch.bfloat16) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
        for a in _cuda(op_inputs(op, torch.float64, B=2, N=9, W=4, R=2))
    )
    args64 = tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args16)
    for got, want in zip(_as_tuple(getattr(sm.ops, op)(*args16)), _as_tuple(getattr(sm.ops, op)(*args64)), strict=True):
        assert got.dtype == (torch.bfloat16 if want.is_floating_point() else want.dtype)
        torch.testing.assert_close(got.double(), want.double(), **tolerance(torch.bfloat16))


def _distinct_memory(B, N, W, dtype, top, seed=0):
    """Memory and keys (R = 3) whose `top` best scores differ by far more than float32 rounding."""
    g = torch.Generator().manual_seed(seed)
    memory = torch.randn(B, N, W, generator=g, dtype=torch.float64)
    keys = torch.randn(B, 3, W, generator=g, dtype=torch.float64)
    best = torch.topk(cosine_similarity_ref(memory, keys), min(top + 1, N), dim=-1).values
    assert (best.diff(dim=-1) < -1e-6).all(), "pick another seed: near-tied scores"
    return memory.to(dtype).cuda(), keys.to(dtype).cuda()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("N", "k", "seed"), [(37, 1, 0), (20001, 8, 0), (20001, 40, 6), (2**16, 8, 0)])
def test_topk_content_over_many_splits_on_gpu(N, k, seed, dtype, use_backend):
    # N = 20001 and 2^16: many blocks per batch row, whose partial top-K are merged; k = 40 holds
    # more than a warp's 32 lanes in each list
    cuda_backend("topk_content")
    use_backend("cuda")
    memory, keys = _distinct_memory(3, N, 6 if N < 2**16 else 64, dtype, top=k, seed=seed)
    memory.requires_grad_(True)
    keys.requires_grad_(True)
    want_scores, want_indices = torch.topk(cosine_similarity_ref(memory, keys), k, dim=-1)
    scores, indices = sm.ops.topk_content(memory, keys, k)
    assert torch.equal(indices, want_indices)
    torch.testing.assert_close(scores, want_scores, **tolerance(dtype))
    seed = torch.randn_like(scores)
    got = torch.autograd.grad(scores, (memory, keys), seed)
    want = torch.autograd.grad(want_scores, (memory, keys), seed)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **tolerance(dtype))


def test_topk_content_ties_go_to_the_lower_slot_on_gpu(use_backend):
    cuda_backend("topk_content")
    use_backend("cuda")
    N = 20001  # the tied slots fall in different blocks and different warps
    g = torch.Generator().manual_seed(0)
    memory = torch.randn(2, N, 4, generator=g, dtype=torch.float64)
    keys = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    tied = [2, 5, 9, 14, N // 2, N - 2]
    for slot in reversed(tied):
        memory[:, slot] = keys[:, 0] * 2
    _, indices = sm.ops.topk_content(memory.cuda(), keys.cuda(), 6)
    assert indices[:, 0].tolist() == [tied] * 2


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("batch", "num_slots", "tie"), [(3, 33, (3, 20)), (2, 3001, (7, 100))])
def test_topk_content_of_every_slot_on_gpu(batch, num_slots, tie, dtype, use_backend):
    # k = N: 33 fits shared memory (the warps' lists merged in the block); R * K = 3 * 3001 pairs
    # do not (scores + stable sort instead). Every slot once, sorted, a tie: the lower slot first.
    cuda_backend("topk_content")
    use_backend("cuda")
    g = torch.Generator().manual_seed(num_slots)
    memory = torch.randn(batch, num_slots, 5, generator=g, dtype=torch.float64)
    keys = torch.randn(batch, 3, 5, generator=g, dtype=torch.float64)
    first, second = tie
    memory[:, second] = memory[:, first]
    memory, keys = memory.to(dtype).cuda(), keys.to(dtype).cuda()
    scores, indices = sm.ops.topk_content(memory, keys, num_slots)
    want_scores, want_indices = torch.sort(cosine_similarity_ref(memory, keys), dim=-1, descending=True, stable=True)
    torch.testing.assert_close(scores, want_scores, **tolerance(dtype))
    assert (indices.sort(-1).values == torch.arange(num_slots, device="cuda")).all()
    if dtype == torch.float64:  # float32 rounding may swap near-equal neighbours
        assert torch.equal(indices, want_indices)
    position = (indices == first).nonzero()[:, -1].view(batch, 3, 1)
    assert (indices.gather(-1, position + 1) == second).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k", [1, 8, 40])
def test_sparse_read_with_repeated_slots_on_gpu(k, dtype, use_backend):
    # slots repeated within and across heads: their memory gradients add up without races
    cuda_backend("sparse_read")
    use_backend("cuda")
    g = torch.Generator().manual_seed(k)
    memory = torch.randn(3, 50, 70, generator=g, dtype=dtype).cuda().requires_grad_(True)
    indices = torch.randint(0, 50, (3, 3, k), generator=g).cuda()
    keys = torch.randn(3, 3, 70, generator=g, dtype=dtype).cuda().requires_grad_(True)
    strengths = (torch.rand(3, 3, generator=g, dtype=dtype) * 10).cuda().requires_grad_(True)
    got = sm.ops.sparse_read(memory, indices, keys, strengths)
    want = reference.sparse_read_ref(memory, indices, keys, strengths)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **tolerance(dtype))
    seeds = [torch.randn_like(o) for o in got]
    leaves = (memory, keys, strengths)
    for a, b in zip(torch.autograd.grad(got, leaves, seeds), torch.autograd.grad(want, leaves, seeds), strict=True):
        torch.testing.assert_close(a, b, **tolerance(dtype))


@pytest.mark.parametrize("J", [1, 33, 300])
def test_sparse_write_on_gpu(J, use_backend):
    cuda_backend("sparse_write")
    use_backend("cuda")
    g = torch.Generator().manual_seed(J)
    rows = torch.randn(3, J, 65, generator=g, dtype=torch.float64).cuda().requires_grad_(True)
    weights = torch.rand(3, J, generator=g, dtype=torch.float64).cuda().requires_grad_(True)
    add = torch.randn(3, 65, generator=g, dtype=torch.float64).cuda().requires_grad_(True)
    erase_rows = (torch.rand(3, J, generator=g) < 0.3).cuda()
    got = sm.ops.sparse_write(rows, weights, add, erase_rows)
    want = reference.sparse_write_ref(rows, weights, add, erase_rows)
    torch.testing.assert_close(got, want, **tolerance(torch.float64))
    seed = torch.randn_like(got)
    leaves = (rows, weights, add)
    for a, b in zip(torch.autograd.grad(got, leaves, seed), torch.autograd.grad(want, leaves, seed), strict=True):
        torch.testing.assert_close(a, b, **tolerance(torch.float64))


@pytest.mark.parametrize("name", ["sam", "sdnc"])
def test_sparse_memory_with_cuda_kernels_matches_torch_on_gpu(name, use_backend):
    # whole steps (forward and backward through the journal), every sparse op on its cuda kernel
    cuda_backend("sparse_read")
    module = {"sam": SAMMemory, "sdnc": SDNCMemory}[name](1000, 9, 3, k=4).double().cuda()
    g = torch.Generator().manual_seed(0)
    # a preloaded memory: no tied scores, whose order the torch backend leaves to torch.topk
    memory = torch.randn(3, 1000, 9, generator=g, dtype=torch.float64).cuda()
    parts = [torch.randn(3, module.interface_size, generator=g, dtype=torch.float64).cuda() for _ in range(5)]
    parts = [p.requires_grad_(True) for p in parts]

    def run(backend):
        use_backend(backend)
        state = module.init_state(3, memory)
        reads = []
        for part in parts:
            read, state = module.step(state, part)
            reads.append(read)
        reads = torch.stack(reads)
        return reads, torch.autograd.grad((reads**2).sum(), parts)

    (got, got_grads), (want, want_grads) = run("cuda"), run("torch")
    torch.testing.assert_close(got, want, **tolerance(torch.float64))
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_journaled_write_on_gpu(backend, dtype, use_backend):
    # SAM's in-place write (repeated slots, unwritten slots read as a non-zero initial word, erased
    # rows) and its backward through the journal, against the torch backend on the GPU
    if backend not in _backends.implementations("journaled_write"):
        pytest.skip(f"no {backend} kernel for journaled_write")
    from sparsemem.memory.journal import JournaledMemory
    from sparsemem.memory.row_store import RowStore
    from sparsemem.memory.sam import group_sum

    B, N, W, J = 3, 50, 65, 33
    g = torch.Generator().manual_seed(0)
    initial = torch.randn(W, generator=g, dtype=dtype).cuda()
    slots = torch.randint(0, N, (B, J), generator=g).cuda()
    slots[:, 1] = slots[:, 0]
    raw = torch.rand(B, J, generator=g, dtype=dtype).cuda().requires_grad_(True)
    add = torch.randn(B, W, generator=g, dtype=dtype).cuda().requires_grad_(True)
    erase_rows = slots == slots[:, -1:]
    prewritten = torch.randint(0, N, (B, 10), generator=g).cuda()
    prerows = torch.randn(B * 10, W, generator=g, dtype=dtype).cuda()

    def run(chosen):
        use_backend(chosen)
        store = RowStore(B, N, initial)
        store.write(store.row_ids(prewritten), prerows)
        memory = JournaledMemory(store)
        total, first = group_sum(slots, raw)
        _, old, new = store.sparse_write(slots, total.detach(), add.detach(), erase_rows)
        memory.write(slots, total, add, erase_rows, first)
        rows = memory.gather(slots)
        grads = torch.autograd.grad((rows * torch.linspace(-1, 1, rows.numel(), device="cuda").view_as(rows)).sum(),
                                    (raw, add))  # fmt: skip
        return old, new, store.dense(), store.written.clone(), grads

    got, want = run(backend), run("torch")
    assert torch.equal(got[0], want[0])  # the journal entry: a copy
    for a, b in zip((got[1], got[2], *got[4]), (want[1], want[2], *want[4]), strict=True):
        torch.testing.assert_close(a, b, **tolerance(dtype))
    assert torch.equal(got[3], want[3])


# --- edge cases from a review of the CUDA kernels (csrc/cuda) before their first GPU run: an empty
# batch, one-column words, K = N, -0.0 usages, offsets past 2^31 elements, a slot twice in a link row


@pytest.mark.parametrize("op", ["content_weights", "content_read", "memory_read", "memory_write"])
def test_dense_cuda_kernels_with_an_empty_batch_on_gpu(op, use_backend):
    # B = 0: the split count must not divide by B, and no kernel may be launched on a 0-block grid
    cuda_backend(op)
    use_backend("cuda")
    args = _cuda(op_inputs(op, torch.float32, B=0, N=33, W=9, R=3), requires_grad=True)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    outputs = _as_tuple(getattr(sm.ops, op)(*args))
    expected = _as_tuple(getattr(reference, f"{op}_ref")(*args))
    assert [o.shape for o in outputs] == [e.shape for e in expected]
    grads = torch.autograd.grad(outputs, leaves, [torch.ones_like(o) for o in outputs])
    assert [g.shape for g in grads] == [a.shape for a in leaves]


@pytest.mark.parametrize(("op", "backend"), [*gpu_cases(), *sparse_gpu_cases()])
def test_one_column_words_on_gpu(op, backend, use_backend):
    # W = 1: 31 of a warp's 32 lanes hold no column of a word (the warp sums still take all 32)
    use_backend(backend)
    args = _cuda(op_inputs(op, torch.float64, B=3, N=33, W=1, R=3), requires_grad=True)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    outputs = _float_outputs(op)(*args)
    expected = [o for o in _as_tuple(getattr(reference, f"{op}_ref")(*args)) if o.is_floating_point()]
    for got, want in zip(outputs, expected, strict=True):
        torch.testing.assert_close(got, want, **tolerance(torch.float64))
    seeds = [torch.randn_like(o) for o in outputs]
    got = torch.autograd.grad(outputs, leaves, seeds)
    want = torch.autograd.grad(expected, leaves, seeds)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **tolerance(torch.float64))


@pytest.mark.parametrize("N", [33, 1000])
def test_sparse_read_of_every_slot_is_content_read_on_gpu(N, use_backend):
    # K = N (DESIGN.md): sparse_read over all N slots, in a shuffled order, is content_read
    cuda_backend("sparse_read")
    use_backend("cuda")
    memory, keys, strengths = _cuda(op_inputs("content_read", torch.float64, B=3, N=N, W=9, R=3))
    g = torch.Generator().manual_seed(N)
    indices = torch.stack([torch.randperm(N, generator=g) for _ in range(9)]).reshape(3, 3, N).cuda()
    weights, reads = sm.ops.sparse_read(memory, indices, keys, strengths)
    want_weights, want_reads = reference.content_read_ref(memory, keys, strengths)
    torch.testing.assert_close(weights, want_weights.gather(-1, indices), **tolerance(torch.float64, reduced_over=N))
    torch.testing.assert_close(reads, want_reads, **tolerance(torch.float64, reduced_over=N))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_allocation_with_negative_zero_usages_on_gpu(dtype, use_backend):
    # -0.0 ties with 0.0 (slot order first), as in torch's compare and the C++ kernel
    cuda_backend("allocation_weights")
    use_backend("cuda")
    usage = hard_usages(4, 4097, dtype)
    odd = torch.arange(4097) % 2 == 1
    usage = torch.where((usage == 0) & odd, torch.tensor(-0.0, dtype=dtype), usage)
    assert usage.signbit().any()
    want = reference.allocation_weights_ref(usage)
    got = sm.ops.allocation_weights(usage.cuda())
    torch.testing.assert_close(got.cpu(), want, **tolerance(dtype, reduced_over=4097))


def test_offsets_past_2_31_elements_on_gpu(use_backend):
    # memory [2, 2^20 + 3, 1024] holds more than 2^31 elements: the last batch row's offsets need
    # int64 arithmetic. Every word is e_0 but the last one of batch row 1, which matches the key.
    cuda_backend("topk_content")
    use_backend("cuda")
    B, N, W = 2, 2**20 + 3, 1024
    memory = torch.zeros(B, N, W, device="cuda")
    memory[:, :, 0] = 1
    keys = torch.zeros(B, 1, W, device="cuda")
    keys[:, :, 1] = 1
    memory[1, N - 1] = keys[1, 0] * 3
    scores, indices = sm.ops.topk_content(memory, keys, 1)
    assert indices.flatten().tolist() == [0, N - 1]
    assert scores[1, 0, 0].item() == pytest.approx(1, abs=1e-5)
    _, reads = sm.ops.sparse_read(memory, indices, keys, torch.ones(B, 1, device="cuda"))
    torch.testing.assert_close(reads[1, 0], memory[1, N - 1])
    read_w = torch.zeros(B, 1, N, device="cuda")
    read_w[:, 0, N - 1] = 1
    torch.testing.assert_close(sm.ops.memory_read(memory, read_w)[1, 0], memory[1, N - 1])
    weights, reads = sm.ops.content_read(memory, keys, torch.full((B, 1), 50.0, device="cuda"))
    assert weights[1, 0].argmax().item() == N - 1
    torch.testing.assert_close(reads[1, 0], memory[1, N - 1], **tolerance(torch.float32, reduced_over=N))


def test_sparse_link_update_with_a_slot_twice_in_a_row_on_gpu(use_backend):
    # Outside the contract (a row of L holds a slot once), but a row holding one twice can keep it
    # twice: the backward adds both grads into the slot's first place, as the C++ kernel does, with
    # one writer per place (no race).
    cuda_backend("sparse_link_update")
    args = list(link_update_inputs(3, 33, 4, 9, torch.float64, seed=0))
    both = (args[1][..., 0] >= 0) & (args[1][..., 1] >= 0)
    args[1] = args[1].clone()
    args[1][..., 1] = torch.where(both, args[1][..., 0], args[1][..., 1])

    def run(backend, device):
        use_backend(backend)
        inputs = [a.to(device).requires_grad_(a.is_floating_point()) for a in args]
        outputs = sm.ops.sparse_link_update(*inputs)
        floats = [o for o in outputs if o.is_floating_point()]
        g = torch.Generator().manual_seed(1)
        seeds = [torch.randn(o.shape, generator=g, dtype=o.dtype).to(device) for o in floats]
        grads = torch.autograd.grad(floats, [a for a in inputs if a.requires_grad], seeds)
        return [o.cpu() for o in outputs], [grad.cpu() for grad in grads]

    (got, got_grads), (want, want_grads) = run("cuda", "cuda"), run("cpp", "cpu")
    kept = want[1].sort(-1).values
    assert ((kept[..., 1:] == kept[..., :-1]) & (kept[..., 1:] >= 0)).any(), "no row kept a slot twice"
    _assert_link_outputs(got, want, torch.float64)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, **tolerance(torch.float64))
