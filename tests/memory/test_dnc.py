"""DNCMemory's link chain: ops.link_update_reads(checkpoint_every=k) keeps the N x N link of every
k-th step for the backward and rebuilds the others, with the values and gradients of the plain op
and of the float64 reference, on every backend; and the DNC step built on it matches a float64
reference step."""

import gc

import pytest
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

import sparsemem as sm
from sparsemem import reference
from sparsemem.memory import DNCMemory
from tests.conftest import cpu_backends
from tests.tolerances import tolerance

LINK_BACKENDS = cpu_backends("link_update_reads")


def chain_inputs(dtype, B=3, N=9, R=3, T=7, seed=0):
    """L_0 (nonzero, zero diagonal), p_0, and per step a write weighting (sum <= 1) and read weightings."""
    g = torch.Generator().manual_seed(seed)
    link = torch.rand(B, N, N, generator=g, dtype=torch.float64) / N
    link = (link * (1 - torch.eye(N, dtype=torch.float64))).to(dtype)
    precedence = (torch.rand(B, N, generator=g, dtype=torch.float64) / N).to(dtype)
    writes = [0.9 * torch.softmax(3 * torch.randn(B, N, generator=g, dtype=torch.float64), -1) for _ in range(T)]
    writes = [w.to(dtype) for w in writes]
    reads = [torch.softmax(3 * torch.randn(B, R, N, generator=g, dtype=torch.float64), -1).to(dtype) for _ in range(T)]
    return link, precedence, writes, reads


def run_chain(step, link, precedence, writes, reads):
    """T steps of step(link, precedence, write_w, read_w) -> a loss that weighs every output."""
    g = torch.Generator().manual_seed(1)
    loss = 0
    for write_w, read_w in zip(writes, reads, strict=True):
        link, precedence, forward, backward = step(link, precedence, write_w, read_w)
        for out in (forward, backward, precedence):
            loss = loss + (out * torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)).sum()
    return loss + (link * link).sum(), link


def leaves_of(dtype, **sizes):
    link, precedence, writes, reads = chain_inputs(dtype, **sizes)
    return [x.requires_grad_(True) for x in (link, precedence, *writes, *reads)]


def split(leaves):
    T = (len(leaves) - 2) // 2
    return leaves[0], leaves[1], leaves[2 : 2 + T], leaves[2 + T :]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("every", [1, 3])
@pytest.mark.parametrize("backend", LINK_BACKENDS)
def test_checkpointed_chain_matches_the_reference(backend, every, dtype, use_backend):
    use_backend(backend)
    leaves = leaves_of(dtype)
    loss, _ = run_chain(lambda *a: sm.ops.link_update_reads(*a, checkpoint_every=every), *split(leaves))
    got = torch.autograd.grad(loss, leaves)
    leaves64 = [x.detach().double().requires_grad_(True) for x in leaves]
    want_loss, _ = run_chain(reference.link_update_reads_ref, *split(leaves64))
    want = torch.autograd.grad(want_loss, leaves64)
    torch.testing.assert_close(loss.double(), want_loss, **tolerance(dtype))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, **tolerance(dtype))


@pytest.mark.parametrize("backend", LINK_BACKENDS)
def test_checkpointed_chain_gives_the_plain_ops_gradients(backend, use_backend):
    """The rebuilt links are the forward's own (same kernel, same inputs): the same gradients."""
    use_backend(backend)
    grads = {}
    for every in (None, 3):
        leaves = leaves_of(torch.float32, T=8)
        loss, _ = run_chain(lambda *a, k=every: sm.ops.link_update_reads(*a, checkpoint_every=k), *split(leaves))
        grads[every] = torch.autograd.grad(loss, leaves)
    for g, w in zip(grads[3], grads[None], strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("backend", [b for b in LINK_BACKENDS if b != "triton"])  # interpreted: minutes
def test_checkpointed_chain_gradcheck(backend, use_backend):
    use_backend(backend)
    leaves = leaves_of(torch.float64, B=2, N=5, R=2, T=5)

    def loss(*inputs):
        return run_chain(lambda *a: sm.ops.link_update_reads(*a, checkpoint_every=2), *split(list(inputs)))[0]

    assert torch.autograd.gradcheck(loss, leaves)


def test_backward_keeps_the_links_of_every_kth_step_only():
    """After a forward of T steps, holding only the last output: the plain op keeps the T links it
    was given alive for the backward (and L_T too through ops/_define.py's autograd.Function, which
    saves outputs; the cpp backend's C++ node does not), the chain only L_0, L_k, L_2k, ..."""
    T = 9
    alive = {}
    for every in (None, 4):
        link, precedence, writes, reads = chain_inputs(torch.float32, T=T)
        writes = [w.requires_grad_(True) for w in writes]
        refs = [StorageWeakRef(link.untyped_storage())]
        loss = 0
        for write_w, read_w in zip(writes, reads, strict=True):
            link, precedence, forward, backward = sm.ops.link_update_reads(
                link, precedence, write_w, read_w, checkpoint_every=every
            )
            refs.append(StorageWeakRef(link.untyped_storage()))
            loss = loss + forward.sum() + backward.sum()
        del link
        gc.collect()
        alive[every] = sum(not ref.expired() for ref in refs)
        torch.autograd.grad(loss, writes)
    assert alive[None] in (T, T + 1)
    assert alive[4] == len(range(0, T, 4))  # L_0, L_4, L_8: the starts of the segments


def test_branches_from_one_state_each_get_their_gradients():
    """Two chains that continue from the same link (a state used twice) start segments of their
    own where they part: each gets the gradients of its own steps."""
    link, precedence, writes, reads = chain_inputs(torch.float64, T=6)
    writes = [w.requires_grad_(True) for w in writes]

    def steps(link, precedence, pairs, every):
        total = 0
        for write_w, read_w in pairs:
            link, precedence, forward, _ = sm.ops.link_update_reads(
                link, precedence, write_w, read_w, checkpoint_every=every
            )
            total = total + forward.square().sum()
        return link, precedence, total

    results = {}
    for every in (None, 4):
        shared_link, shared_precedence, head = steps(link, precedence, zip(writes[:2], reads[:2], strict=True), every)
        _, _, first = steps(shared_link, shared_precedence, zip(writes[2:4], reads[2:4], strict=True), every)
        _, _, second = steps(shared_link, shared_precedence, zip(writes[4:], reads[4:], strict=True), every)
        results[every] = torch.autograd.grad(head + first + 2 * second, writes)
    for g, w in zip(results[4], results[None], strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def dnc_step_ref(memory, state, interface):
    """One DNC memory step in float64 from the reference ops, in DESIGN.md's order."""
    usage = reference.usage_update_ref(state["usage"], state["write_w"], state["read_w"], interface.free_gates)
    allocation = reference.allocation_weights_ref(usage)
    write_content = reference.content_weights_ref(state["memory"], interface.write_key, interface.write_strength)[:, 0]
    gate_a = interface.allocation_gate
    write_w = interface.write_gate * (gate_a * allocation + (1 - gate_a) * write_content)
    new_memory = reference.memory_write_ref(state["memory"], write_w, interface.erase, interface.write_vector)
    link, precedence = reference.link_update_ref(state["link"], state["precedence"], write_w)
    forward, backward = reference.temporal_reads_ref(link, state["read_w"])
    read_content = reference.content_weights_ref(new_memory, interface.read_keys, interface.read_strengths)
    modes = interface.read_modes
    read_w = modes[..., 0:1] * backward + modes[..., 1:2] * read_content + modes[..., 2:3] * forward
    reads = reference.memory_read_ref(new_memory, read_w)
    new = dict(memory=new_memory, usage=usage, link=link, precedence=precedence, read_w=read_w, write_w=write_w)
    return reads, new


@pytest.mark.parametrize("backend", LINK_BACKENDS)
def test_dnc_steps_match_the_float64_reference(backend, use_backend):
    """T float32 steps of DNCMemory (links checkpointed every 2 steps) against the reference steps in
    float64: the reads, and the gradients of the interface vectors."""
    use_backend(backend)
    B, N, W, R, T = 3, 13, 5, 3, 6
    memory = DNCMemory(N, W, R)
    memory.link_checkpoint_every, memory.link_checkpoint_bytes = 2, 0
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(T, B, memory.interface_size, generator=g, dtype=torch.float64).requires_grad_(True)
    seeds = torch.randn(T, B, R, W, generator=g, dtype=torch.float64)

    state = memory.init_state(B, dtype=torch.float32)
    loss = 0
    for t in range(T):
        reads, state = memory.step(state, memory.split_interface(raw[t].float()))
        loss = loss + (reads.double() * seeds[t]).sum()
    (got,) = torch.autograd.grad(loss, raw)

    zeros = memory.init_state(B, dtype=torch.float64)
    ref_state = dict(
        memory=zeros.memory, usage=zeros.usage, link=zeros.link, precedence=zeros.precedence,
        read_w=zeros.read_weights, write_w=zeros.write_weights,
    )  # fmt: skip
    want_loss = 0
    for t in range(T):
        reads, ref_state = dnc_step_ref(memory, ref_state, memory.split_interface(raw[t]))
        want_loss = want_loss + (reads * seeds[t]).sum()
    (want,) = torch.autograd.grad(want_loss, raw)
    torch.testing.assert_close(loss.double(), want_loss, **tolerance(torch.float32))
    torch.testing.assert_close(got, want, **tolerance(torch.float32))


@pytest.mark.parametrize("every", [None, 1, 3])
def test_dnc_model_gradients_do_not_depend_on_the_checkpoint_interval(every):
    torch.manual_seed(0)
    # a GRU cell: the step loop, whose links the chain keeps (an LSTM cell's steps run as one op)
    model = sm.DNC(5, 16, num_slots=11, word_size=6, num_reads=3, controller=nn.GRUCell(5 + 3 * 6, 16)).double()
    x = torch.randn(3, 9, 5, dtype=torch.float64)
    model.memory.link_checkpoint_every, model.memory.link_checkpoint_bytes = None, 0
    y, _ = model(x)
    want = torch.autograd.grad(y.square().sum(), list(model.parameters()))
    model.memory.link_checkpoint_every = every
    y, _ = model(x)
    got = torch.autograd.grad(y.square().sum(), list(model.parameters()))
    # The rebuilt links are the kept ones bit for bit, but the chain's nodes change the order in which
    # autograd adds a step's two read gradients (the output layer's, over all steps at once, and the
    # next step's): the sums differ in the last bit
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **tolerance(torch.float64))


def test_checkpoint_every_must_be_a_positive_int():
    link, precedence, writes, reads = chain_inputs(torch.float32, T=1)
    with pytest.raises(ValueError, match="checkpoint_every must be a positive int"):
        sm.ops.link_update_reads(link, precedence, writes[0], reads[0], checkpoint_every=0)


def test_a_padded_row_keeps_its_links_and_precedence_bit_for_bit():
    """Inactive rows write zeros to the links instead of a where over the N x N links afterwards:
    L' = L (zero diagonal) and p' = p exactly; the active rows step as without padding."""
    torch.manual_seed(0)
    B, N, W, R = 3, 9, 4, 2
    memory = DNCMemory(N, W, R)
    state = memory.init_state(B)
    for _ in range(3):  # links and precedence that are not zero
        _, state = memory.step(state, memory.split_interface(torch.randn(B, memory.interface_size)))
    interface = memory.split_interface(torch.randn(B, memory.interface_size))
    active = torch.tensor([True, False, True])
    _, padded = memory.step(state, interface, active)
    _, plain = memory.step(state, interface)
    for name in ("link", "precedence"):
        assert torch.equal(getattr(padded, name)[~active], getattr(state, name)[~active])
        assert torch.equal(getattr(padded, name)[active], getattr(plain, name)[active])
    assert torch.equal(padded.memory[~active], state.memory[~active])


def test_an_empty_batch_goes_through_the_chain():
    link, precedence, writes, reads = chain_inputs(torch.float32, B=0, T=2)
    writes = [w.requires_grad_(True) for w in writes]
    total = 0
    for write_w, read_w in zip(writes, reads, strict=True):
        link, precedence, forward, backward = sm.ops.link_update_reads(
            link, precedence, write_w, read_w, checkpoint_every=4
        )
        total = total + forward.sum() + backward.sum()
    assert link.shape == (0, 9, 9)
    assert all(g.shape == (0, 9) for g in torch.autograd.grad(total, writes))


def test_links_below_link_checkpoint_bytes_are_all_kept():
    """A small DNC's links take the plain op (every link kept, no chain to rebuild them from); from
    link_checkpoint_bytes up, the checkpointed chain."""
    memory = DNCMemory(7, 4, 2)
    raw = torch.randn(3, memory.interface_size, requires_grad=True)

    def link_node() -> str:
        _, state = memory.step(memory.init_state(3), memory.split_interface(raw))
        return state.link.grad_fn.name()

    assert "ChainStep" not in link_node()  # 3 x 7 x 7 float32 links: 588 bytes
    memory.link_checkpoint_bytes = 588
    assert "ChainStep" in link_node()
