"""SDNCMemory against reference/sdnc.py, and the sparse links against the dense DNC links."""

import pytest
import torch

from sparsemem import reference as ref
from sparsemem.memory.sdnc import SDNCInterface, SDNCMemory
from sparsemem.reference.sdnc import sdnc_step_ref, sparse_link_update_ref, sparse_temporal_reads_ref
from sparsemem.testing import op_inputs
from tests.tolerances import tolerance

B, N, W, R, T = 3, 7, 5, 3, 6
FIELDS = ("keys", "strengths", "add", "write_gate", "interp_gate", "read_modes")


def interfaces(dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.rand(*shape, generator=g, dtype=dtype)

    return [
        SDNCInterface(
            torch.randn(B, R, W, generator=g, dtype=dtype),
            1 + 3 * rand(B, R),
            torch.randn(B, W, generator=g, dtype=dtype),
            rand(B),
            rand(B),
            torch.softmax(2 * torch.randn(B, R, 3, generator=g, dtype=dtype), dim=-1),
        )
        for _ in range(T)
    ]


def run_sparse(parts, k, link_k, memory=None):
    module = SDNCMemory(N, W, R, k=k, link_k=link_k).to(parts[0].add.dtype)
    state = module.init_state(B, memory)
    reads = []
    for part in parts:
        read, state = module.step(state, part)
        reads.append(read)
    return torch.stack(reads, 1), state


def run_dense(parts, k, link_k, memory=None):
    dtype = parts[0].add.dtype
    memory = torch.zeros(B, N, W, dtype=dtype) if memory is None else memory
    last_access = torch.zeros(B, N, dtype=torch.int64)
    read_w, precedence = torch.zeros(B, R, N, dtype=dtype), torch.zeros(B, N, dtype=dtype)
    link = backward_link = torch.zeros(B, N, N, dtype=dtype)
    reads = []
    for t, p in enumerate(parts):
        read, read_w, _, memory, last_access, link, backward_link, precedence = sdnc_step_ref(
            memory, last_access, read_w, link, backward_link, precedence, p.keys, p.strengths, p.add,
            p.write_gate, p.interp_gate, p.read_modes, k, link_k, t + 1,
        )  # fmt: skip
        reads.append(read)
    return torch.stack(reads, 1), (link, backward_link, precedence), read_w


def test_links_with_link_k_n_are_the_dense_dnc_links():
    link, precedence, write_w = op_inputs("link_update", torch.float64, B=3, N=N)
    sparse_link, backward_link, sparse_precedence = sparse_link_update_ref(
        link, link.transpose(1, 2), precedence, write_w, N
    )
    want_link, want_precedence = ref.link_update_ref(link, precedence, write_w)
    torch.testing.assert_close(sparse_link, want_link)
    torch.testing.assert_close(backward_link, want_link.transpose(1, 2))
    torch.testing.assert_close(sparse_precedence, want_precedence)
    read_w = op_inputs("memory_read", torch.float64, B=3, N=N)[1]
    forward, backward = sparse_temporal_reads_ref(want_link, want_link.transpose(1, 2), read_w, N)
    want_forward, want_backward = ref.temporal_reads_ref(want_link, read_w)
    torch.testing.assert_close(forward, want_forward)
    torch.testing.assert_close(backward, want_backward)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("k", "link_k", "preloaded"), [(N, N, False), (N, N, True), (3, 3, True), (3, N, True)])
def test_steps_and_links_match_dense_reference(k, link_k, preloaded, dtype):
    parts = interfaces(dtype)
    memory = torch.randn(B, N, W, generator=torch.Generator().manual_seed(2), dtype=dtype) if preloaded else None
    reads, state = run_sparse(parts, k, link_k, memory)
    want_reads, want_links, want_read_w = run_dense(parts, k, link_k, memory)
    torch.testing.assert_close(reads, want_reads, **tolerance(dtype))
    for got, want in zip(state.links.dense(N), want_links, strict=True):
        torch.testing.assert_close(got, want, **tolerance(dtype))
    torch.testing.assert_close(state.read_weights.dense(N), want_read_w, **tolerance(dtype))


@pytest.mark.parametrize(("k", "link_k"), [(N, N), (3, 3)])
def test_gradients_match_dense_reference(k, link_k):
    parts = interfaces()
    memory = torch.randn(B, N, W, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    inputs = [getattr(p, f).requires_grad_(True) for p in parts for f in FIELDS] + [memory.requires_grad_(True)]

    def loss(reads):
        return (reads**2).sum() + (reads * reads.sum()).sum()

    got = torch.autograd.grad(loss(run_sparse(parts, k, link_k, memory)[0]), inputs)
    want = torch.autograd.grad(loss(run_dense(parts, k, link_k, memory)[0]), inputs)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)  # summed over T = 6 steps of O(10) terms


def test_link_storage_grows_with_written_slots_not_n():
    module = SDNCMemory(1 << 17, 4, 2, k=4, link_k=4)
    state = module.init_state(2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(4):
            _, state = module.step(state, torch.randn(2, module.interface_size, generator=g))
    rows = state.links.slots.shape[1]
    assert rows <= 4 * (2 * 3 * 4 + 1)
    assert state.links.forward_values.shape == (2, rows, 4)


def test_detach_and_reset():
    module = SDNCMemory(N, W, R, k=3, link_k=3).double()
    state = module.init_state(B)
    for part in interfaces():
        _, state = module.step(state, part)
    state = state.detach()
    assert not state.links.forward_values.requires_grad
    state = state.reset(torch.tensor([True, False, False]))
    assert (state.links.slots[0] == -1).all() and (state.links.precedence_values[0] == 0).all()
    fresh = module.init_state(B)
    for part in interfaces(seed=7):
        read, state = module.step(state, part)
        want, fresh = module.step(fresh, part)
    torch.testing.assert_close(read[0], want[0], **tolerance(torch.float64))
