"""The fast kernels of SDNC's sparse link ops (sparse_link_update, sparse_temporal_reads) beyond
the generic op tests (tests/ops/test_registered_ops.py): odd sizes and several K_L, ties (values on
a grid of binary fractions, exact in every dtype, so the order must be the reference's), repeated
write and read slots, padding and empty rows, rows gathered only in part, and outputs that start
as NaN."""

import pytest
import torch

import sparsemem as sm
from sparsemem import reference
from tests.conftest import cpu_backends
from tests.kernels.inputs import link_update_inputs, temporal_reads_inputs
from tests.tolerances import tolerance

LINK_OPS = ("sparse_link_update", "sparse_temporal_reads")
CASES = [(op, backend) for op in LINK_OPS for backend in cpu_backends(op) if backend != "torch"]
DTYPES = [torch.float64, torch.float32]

if not CASES:
    pytest.skip("no fast backend implements the sparse link ops here", allow_module_level=True)


def backends_of(op: str) -> list[str]:
    return [backend for name, backend in CASES if name == op]


def assert_outputs_equal(got, want, dtype):
    for g_, w in zip(got, want, strict=True):
        if w.is_floating_point():
            torch.testing.assert_close(g_, w, **tolerance(dtype))
        else:
            assert torch.equal(g_, w)


def entries(slots, indices, values, transposed=False) -> dict:
    """{(b, i, j): L[i, j]} of a store's rows (of L^T when transposed)."""
    out = {}
    for b, i, m in (indices >= 0).nonzero().tolist():
        row, column = int(slots[b, i]), int(indices[b, i, m])
        out[(b, column, row) if transposed else (b, row, column)] = float(values[b, i, m])
    return out


def check_gradients(op, args, dtype):
    """The op's gradients (through the registered op) against the reference's, for random seeds."""
    args = tuple(a.detach().requires_grad_(True) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    got = [o for o in getattr(sm.ops, op)(*args) if o.is_floating_point()]
    want = [o for o in getattr(reference, f"{op}_ref")(*args) if o.is_floating_point()]
    seeds = [torch.randn(o.shape, generator=torch.Generator().manual_seed(1), dtype=o.dtype) for o in got]
    got_grads = torch.autograd.grad(got, leaves, seeds)
    want_grads = torch.autograd.grad(want, leaves, seeds)
    for g_, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g_, w, **tolerance(dtype))


# N = 45 gathers 47 rows a store: two row blocks and two chunks of the other store in the triton
# kernels (32 rows a block at K_L = 3)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("N", "link_k", "J"), [(7, 3, 5), (13, 5, 9), (45, 3, 9)])
@pytest.mark.parametrize("part", [False, True])
@pytest.mark.parametrize("backend", backends_of("sparse_link_update"))
def test_sparse_link_update_matches_reference(backend, part, N, link_k, J, dtype, use_backend, nan_poisoned):
    use_backend(backend)
    args = link_update_inputs(3, N, link_k, J, dtype, seed=N, part=part)
    got = sm.ops.sparse_link_update(*args)
    assert_outputs_equal(got, reference.sparse_link_update_ref(*args), dtype)
    if not part:  # every row gathered: the stores stay exact transposes of each other
        assert entries(args[0], got[1], got[0]) == entries(args[3], got[3], got[2], transposed=True)
    check_gradients("sparse_link_update", args, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", backends_of("sparse_link_update"))
def test_sparse_link_update_ties_and_repeated_writes(backend, dtype, use_backend, nan_poisoned):
    use_backend(backend)
    args = link_update_inputs(3, 11, 4, 7, dtype, seed=5, ties=True)
    want = reference.sparse_link_update_ref(*args)
    # binary fractions: every value is exact, so equal values are ties in every dtype and backend
    assert any(len(set(row[row > 0].tolist())) < int((row > 0).sum()) for row in want[0].flatten(0, 1))
    got = sm.ops.sparse_link_update(*args)
    for g_, w in zip(got, want, strict=True):
        assert torch.equal(g_, w)


@pytest.mark.parametrize("backend", backends_of("sparse_link_update"))
def test_sparse_link_update_padding_rows_stay_empty(backend, use_backend, nan_poisoned):
    use_backend(backend)
    args = link_update_inputs(2, 9, 3, 5, torch.float64, seed=2)
    new_forward_values, new_forward_indices, new_backward_values, new_backward_indices = sm.ops.sparse_link_update(
        *args
    )[:4]
    for slots, indices, values in ((args[0], new_forward_indices, new_forward_values),
                                   (args[3], new_backward_indices, new_backward_values)):  # fmt: skip
        assert (indices[slots < 0] == -1).all() and (values[slots < 0] == 0).all()
        assert (indices[slots >= 0] >= 0).any()


@pytest.mark.parametrize("backend", backends_of("sparse_link_update"))
def test_sparse_link_update_without_writes_or_precedence(backend, use_backend, nan_poisoned):
    use_backend(backend)
    args = list(link_update_inputs(2, 8, 3, 4, torch.float64, seed=3))
    args[6] = torch.full_like(args[6], -1)
    args[7] = torch.zeros_like(args[7])
    args[8] = torch.full_like(args[8], -1)
    got = sm.ops.sparse_link_update(*args)
    assert_outputs_equal(got, reference.sparse_link_update_ref(*args), torch.float64)
    assert (got[5] == -1).all()


@pytest.mark.parametrize("backend", backends_of("sparse_link_update"))
def test_sparse_link_update_gradcheck(backend, use_backend):
    use_backend(backend)
    args = link_update_inputs(2, 6, 3, 4, torch.float64, seed=4)
    args = tuple(a.requires_grad_(True) if a.is_floating_point() else a for a in args)

    def values(*inputs):
        return tuple(o for o in sm.ops.sparse_link_update(*inputs) if o.is_floating_point())

    assert torch.autograd.gradcheck(values, args, fast_mode=backend == "triton")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("R", "Q", "link_k", "k"), [(3, 5, 3, 1), (3, 7, 5, 4), (1, 4, 3, 20)])
@pytest.mark.parametrize("backend", backends_of("sparse_temporal_reads"))
def test_sparse_temporal_reads_matches_reference(backend, R, Q, link_k, k, dtype, use_backend, nan_poisoned):
    use_backend(backend)
    read_weights, *rows = temporal_reads_inputs(3, 13, R, Q, link_k, dtype, seed=Q)
    got = sm.ops.sparse_temporal_reads(read_weights, *rows, k)
    assert_outputs_equal(got, reference.sparse_temporal_reads_ref(read_weights, *rows, k), dtype)
    if k > Q * link_k:  # more places than candidates: the rest is (0, -1)
        assert (got[1][..., Q * link_k :] == -1).all() and (got[0][..., Q * link_k :] == 0).all()
    check_gradients("sparse_temporal_reads", (read_weights, *rows, k), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", backends_of("sparse_temporal_reads"))
def test_sparse_temporal_reads_ties_and_repeated_slots(backend, dtype, use_backend, nan_poisoned):
    use_backend(backend)
    read_weights, *rows = temporal_reads_inputs(2, 9, 3, 8, 4, dtype, seed=1, ties=True)
    want = reference.sparse_temporal_reads_ref(read_weights, *rows, 6)
    assert any(len(set(row[row > 0].tolist())) < int((row > 0).sum()) for row in want[0].flatten(0, 1))
    got = sm.ops.sparse_temporal_reads(read_weights, *rows, 6)
    for g_, w in zip(got, want, strict=True):
        assert torch.equal(g_, w)


@pytest.mark.parametrize("backend", backends_of("sparse_temporal_reads"))
def test_sparse_temporal_reads_gradcheck(backend, use_backend):
    use_backend(backend)
    read_weights, *rows = temporal_reads_inputs(2, 7, 2, 4, 3, torch.float64, seed=2)
    args = tuple(a.requires_grad_(True) if a.is_floating_point() else a for a in (read_weights, *rows))

    def weights(*inputs):
        return tuple(o for o in sm.ops.sparse_temporal_reads(*inputs, 3) if o.is_floating_point())

    assert torch.autograd.gradcheck(weights, args, fast_mode=backend == "triton")


def spread(slots: torch.Tensor) -> torch.Tensor:
    """Slots moved far apart and past 2^32 in the same order (-1 stays -1): the kernels' hash tables
    of slots see large, scattered keys, and the order outputs are ranked by (slot ascending) holds."""
    return torch.where(slots >= 0, slots * 1_000_003 + 2**33, slots)


@pytest.mark.parametrize("backend", backends_of("sparse_link_update"))
def test_sparse_link_update_on_large_slot_ids(backend, use_backend):
    use_backend(backend)
    args = link_update_inputs(2, 45, 8, 33, torch.float64, seed=3)  # an SDNC step's J = R K + 1 at R = 4, K = 8
    got = sm.ops.sparse_link_update(*(spread(a) if a.dtype == torch.int64 else a for a in args))
    for g_, w in zip(got, reference.sparse_link_update_ref(*args), strict=True):
        if w.is_floating_point():
            torch.testing.assert_close(g_, w, **tolerance(torch.float64))
        else:
            assert torch.equal(g_, spread(w))


@pytest.mark.parametrize("backend", backends_of("sparse_temporal_reads"))
def test_sparse_temporal_reads_on_large_slot_ids(backend, use_backend):
    use_backend(backend)
    read_weights, *rows = temporal_reads_inputs(2, 45, 3, 24, 8, torch.float64, seed=4)  # 192 candidates a head
    big = [spread(a) if a.dtype == torch.int64 else a for a in rows]
    got = sm.ops.sparse_temporal_reads(read_weights, *big, 8)
    for g_, w in zip(got, reference.sparse_temporal_reads_ref(read_weights, *rows, 8), strict=True):
        if w.is_floating_point():
            torch.testing.assert_close(g_, w, **tolerance(torch.float64))
        else:
            assert torch.equal(g_, spread(w))
