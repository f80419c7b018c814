"""SDNCMemory against reference/sdnc.py, and the sparse links against the dense DNC links."""

import pytest
import torch

import sparsemem as sm
from sparsemem import _checks
from sparsemem import reference as ref
from sparsemem.memory.sdnc import SDNCInterface, SDNCMemory
from sparsemem.reference.sdnc import sdnc_link_update_ref, sdnc_step_ref, sdnc_temporal_reads_ref
from sparsemem.testing import link_rows, op_inputs
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
    link = torch.zeros(B, N, N, dtype=dtype)
    reads = []
    for t, p in enumerate(parts):
        read, read_w, _, memory, last_access, link, precedence = sdnc_step_ref(
            memory, last_access, read_w, link, precedence, p.keys, p.strengths, p.add,
            p.write_gate, p.interp_gate, p.read_modes, k, link_k, t + 1,
        )  # fmt: skip
        reads.append(read)
    return torch.stack(reads, 1), (link, link.transpose(1, 2), precedence), read_w


def test_links_with_link_k_n_are_the_dense_dnc_links():
    link, precedence, write_w = op_inputs("link_update", torch.float64, B=3, N=N)
    sparse_link, sparse_precedence = sdnc_link_update_ref(link, precedence, write_w, N)
    want_link, want_precedence = ref.link_update_ref(link, precedence, write_w)
    torch.testing.assert_close(sparse_link, want_link)
    torch.testing.assert_close(sparse_precedence, want_precedence)
    read_w = op_inputs("memory_read", torch.float64, B=3, N=N)[1]
    forward, backward = sdnc_temporal_reads_ref(want_link, read_w, N)
    want_forward, want_backward = ref.temporal_reads_ref(want_link, read_w)
    torch.testing.assert_close(forward, want_forward)
    torch.testing.assert_close(backward, want_backward)


def test_link_cut_keeps_k_l_per_row_and_column():
    link, precedence, write_w = op_inputs("link_update", torch.float64, B=3, N=N)
    cut, _ = sdnc_link_update_ref(link, precedence, write_w, 3)
    assert ((cut > 0).sum(-1) <= 3).all() and ((cut > 0).sum(-2) <= 3).all()
    assert ((cut > 0).sum(-1) == 3).any()


def _dense(slots, indices, values, n):
    """Rows [B, S, K_L] of a store at slots [B, S] (-1: skipped) -> [B, N, N]."""
    dense = values.new_zeros(slots.shape[0], n + 1, n + 1)
    rows = (slots % (n + 1)).unsqueeze(-1).expand_as(indices)
    batches = torch.arange(slots.shape[0]).view(-1, 1, 1).expand_as(indices)
    return dense.index_put((batches, rows, indices % (n + 1)), values, accumulate=True)[:, :n, :n]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n", [7, 33])
def test_sparse_link_ops_on_all_rows_equal_the_dense_links(n, dtype):
    args = op_inputs("sparse_link_update", dtype, B=3, N=n)
    fs, fi, fv, bs, bi, bv, pi, pv, wi, ww = args
    link = _dense(fs, fi, fv, n)
    assert torch.equal(_dense(bs, bi, bv, n), link.transpose(1, 2))
    precedence = pv.new_zeros(3, n + 1).scatter_add(-1, pi % (n + 1), pv)[:, :n]
    write_w = ww.new_zeros(3, n + 1).scatter_add(-1, wi % (n + 1), ww * (wi >= 0))[:, :n]
    want_link, want_precedence = sdnc_link_update_ref(link, precedence, write_w, fi.shape[-1])
    out = sm.ops.sparse_link_update(*args)
    torch.testing.assert_close(_dense(fs, out[1], out[0], n), want_link, **tolerance(dtype))
    assert torch.equal(_dense(bs, out[3], out[2], n), _dense(fs, out[1], out[0], n).transpose(1, 2))
    got_precedence = out[4].new_zeros(3, n + 1).scatter_add(-1, out[5] % (n + 1), out[4])[:, :n]
    torch.testing.assert_close(got_precedence, want_precedence, **tolerance(dtype))

    read_w = op_inputs("memory_read", dtype, B=3, N=n, R=2)[1]
    slots = torch.arange(n).expand(3, 2, -1)
    got = sm.ops.sparse_temporal_reads(
        read_w, *link_rows(want_link, slots, 3), *link_rows(want_link.transpose(1, 2), slots, 3), 4
    )
    for weights, indices, want in zip(got[::2], got[1::2], sdnc_temporal_reads_ref(want_link, read_w, 4), strict=True):
        dense = weights.new_zeros(3, 2, n + 1).scatter_add(-1, indices % (n + 1), weights)[..., :n]
        torch.testing.assert_close(dense, want, **tolerance(dtype))


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


def _saved_bytes(module, state, steps, seed=0):
    """Bytes autograd keeps for `steps` steps from state (saved tensor hooks)."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    g = torch.Generator().manual_seed(seed)
    interface = torch.randn(steps, 2, module.interface_size, generator=g, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        for t in range(steps):
            _, state = module.step(state, interface[t])
    return total


def test_saved_for_backward_does_not_grow_with_slots_written_before():
    # A step saves what it touches: the written slots' link rows and their neighbours, at most
    # J + (J + K_L) K_L rows however many slots were written before (storing every row made it
    # grow with them). The touched rows grow while link rows fill up (K_L = 2: within ~30 steps).
    module = SDNCMemory(1 << 12, 4, 1, k=2, link_k=2)
    state = module.init_state(2)
    g = torch.Generator().manual_seed(0)
    saved, written = [], []
    for t in range(160):
        with torch.no_grad():
            _, state = module.step(state, torch.randn(2, module.interface_size, generator=g))
        if t + 1 in (40, 160):
            saved.append(_saved_bytes(module, state.detach(), 3))
            written.append(int(state.links.store.written.sum()))
    assert written[1] > 3 * written[0], written
    assert saved[1] < 1.1 * saved[0], saved


def test_device_path_saves_the_same_bytes_whatever_was_written_before(monkeypatch):
    # off the host the gathered link rows keep their fixed width: saved bytes are exactly equal
    monkeypatch.setattr(_checks, "on_host", lambda device: False)
    module = SDNCMemory(1 << 12, 4, 1, k=2, link_k=2)
    few, many = module.init_state(2), module.init_state(2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in range(40):
            _, many = module.step(many, torch.randn(2, module.interface_size, generator=g))
            if t < 2:
                _, few = module.step(few, torch.randn(2, module.interface_size, generator=g))
    assert _saved_bytes(module, many.detach(), 3) == _saved_bytes(module, few.detach(), 3)


def test_link_storage_grows_with_written_slots_not_n():
    module = SDNCMemory(1 << 17, 4, 2, k=4, link_k=4)
    state = module.init_state(2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(4):
            _, state = module.step(state, torch.randn(2, module.interface_size, generator=g))
    assert len(state.links.store.written_row_ids([0, 1])) <= 2 * 2 * 4 * (2 * 3 * 4 + 1)


def test_detach_and_reset():
    module = SDNCMemory(N, W, R, k=3, link_k=3).double()
    state = module.init_state(B)
    for part in interfaces():
        _, state = module.step(state, part)
    state = state.detach()
    assert not state.links.precedence_values.requires_grad
    state = state.reset(torch.tensor([True, False, False]))
    link, backward_link, precedence = state.links.dense(N)
    assert (link[0] == 0).all() and (backward_link[0] == 0).all() and (precedence[0] == 0).all()
    assert (link[1] != 0).any()
    fresh = module.init_state(B)
    for part in interfaces(seed=7):
        read, state = module.step(state, part)
        want, fresh = module.step(fresh, part)
    torch.testing.assert_close(read[0], want[0], **tolerance(torch.float64))
