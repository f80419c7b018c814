"""The sparse memories' device path: the timestamp LRU, no host reads, CUDA graphs.

On a GPU every value read on the host (.item(), .tolist(), nonzero, torch.unique, a boolean
index, a host <-> device copy) stalls the step until the device catches up. The device path
(sparsemem._checks.on_host False) never reads: it is checked here three ways on the CPU
(it computes what the host path computes; a step on meta tensors, which cannot be read,
runs through) and, on a GPU, under torch.cuda.set_sync_debug_mode("error").
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sparsemem import _checks
from sparsemem.index import ExactIndex
from sparsemem.index import base as index_base
from sparsemem.memory import SAMMemory, SDNCMemory
from sparsemem.memory.lru import TimestampLRU
from sparsemem.memory.sam import capture_step
from sparsemem.memory.versions import Timeline
from sparsemem.models import SAM
from sparsemem.reference.sam import access_update_ref, lru_ref
from tests.tolerances import tolerance

B, N, W, R, K, T = 3, 11, 5, 2, 3, 6


def interface_tensor(memory, steps, seed=0, device="cpu", dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, memory.interface_size, generator=g, dtype=dtype).to(device) for _ in range(steps)]


@pytest.fixture
def device_path(monkeypatch):
    """Run the device path (no host reads) on the CPU."""
    monkeypatch.setattr(_checks, "on_host", lambda device: False)


@pytest.mark.parametrize("block", [None, 4, 1])
def test_timestamp_lru_matches_the_reference_and_goes_back(block):
    """Whole (block None at this N) and in blocks (4: 3 blocks, the last one padded; 1: a slot a
    block), through touches with ties and resets, and back and forth over them on a timeline."""
    g = torch.Generator().manual_seed(0)
    timeline = Timeline()
    stamped = TimestampLRU(B, N, "cpu", timeline, block=block)
    last_access = torch.zeros(B, N, dtype=torch.int64)
    versions = []  # (version, the reference's LRU there)
    for step in range(1, 60):
        want = lru_ref(last_access)
        assert torch.equal(stamped.least_recent(), want)
        versions.append((timeline.head, want))
        timeline.branch(timeline.head)
        # a few slots per step, repeats included, often several at once: ties to break
        slots = torch.randint(0, N, (B, 4), generator=g)
        accessed = torch.rand(B, 4, generator=g) < 0.6
        stamped.touch(slots, accessed)
        dense = torch.zeros(B, N).scatter_add(-1, slots, accessed.float())
        last_access = access_update_ref(last_access, dense, torch.zeros(B, 1, N), step)
        if step % 9 == 0:
            mask = torch.rand(B, generator=g) < 0.5
            stamped.reset(mask)
            last_access = last_access.masked_fill(mask.unsqueeze(-1), 0)
    for version, want in [versions[5], versions[40], versions[12], versions[-1]]:
        timeline.checkout(version)
        assert torch.equal(stamped.least_recent(), want)


def test_exact_index_on_the_device_path_keeps_the_last_of_repeated_ids(device_path):
    index = ExactIndex(2, 9, 4)
    rows = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    index.update(rows, torch.tensor([[5, 5, 1], [0, 8, 0]]))
    assert index.stats().rows == 4
    scores, slots = index.search(rows, 1)
    # the first rows written to slots 5 and 0 were replaced within the call: only the last are found
    assert slots[0, 1:, 0].tolist() == [5, 1] and slots[1, 1:, 0].tolist() == [8, 0]
    assert scores[0, 0, 0] < 0.999 < scores[0, 1, 0] and scores[1, 0, 0] < 0.999 < scores[1, 2, 0]
    index.reset(torch.tensor([True, False]))
    assert index.stats().rows == 2 and index.unwritten(2).tolist() == [[0, 1], [1, 2]]


def run(memory, parts, preloaded=None, reset_at=None):
    """Steps under grad (with a reset of sample 1 at step reset_at) -> (reads, state, gradients)."""
    leaves = [part.requires_grad_(True) for part in parts]
    state = memory.init_state(B, preloaded)
    reads = []
    for t, part in enumerate(parts):
        if t == reset_at:
            state = state.reset(torch.tensor([False, True, False]))
        read, state = memory.step(state, part)
        reads.append(read)
    reads = torch.stack(reads)
    inputs = leaves + ([preloaded] if preloaded is not None else [])
    grads = torch.autograd.grad((reads * torch.linspace(-1, 1, reads.numel()).view_as(reads)).sum(), inputs)
    return reads, state, grads


@pytest.mark.parametrize("memory_cls", [SAMMemory, SDNCMemory])
@pytest.mark.parametrize("preload", [False, True])
@pytest.mark.parametrize("path", ["device", "dense index"])
def test_device_path_computes_what_the_host_path_computes(monkeypatch, memory_cls, preload, path):
    """The whole step on the device path, or (a small memory's default on the CPU, DENSE_VALUES)
    only its ExactIndex on it, against the host path throughout."""
    memory = memory_cls(N, W, R, k=K).double()
    parts = interface_tensor(memory, T)
    preloaded = torch.randn(B, N, W, dtype=torch.float64, requires_grad=True) if preload else None
    with monkeypatch.context() as host_path:
        host_path.setattr(index_base, "DENSE_VALUES", 0)
        host = run(memory, [p.clone() for p in parts], preloaded, reset_at=3)
    assert host[1].memory.store.index.on_host and host[1].memory.store.on_host
    if path == "device":
        monkeypatch.setattr(_checks, "on_host", lambda device: False)
    device = run(memory, [p.clone() for p in parts], preloaded, reset_at=3)
    assert not device[1].memory.store.index.on_host
    assert device[1].memory.store.on_host == (path == "dense index")
    torch.testing.assert_close(device[0], host[0], **tolerance(torch.float64))
    if preload:
        # Distinct rows, no ties. From a fresh memory equal rows arise (unwritten slots read with
        # equal weights get equal writes) and top-K may break their ties either way: the same
        # reads and gradients, slot ids permuted.
        assert torch.equal(device[1].read_weights.indices, host[1].read_weights.indices)
        assert torch.equal(device[1].memory.store.dense(), host[1].memory.store.dense())
    for got, want in zip(device[2], host[2], strict=True):
        torch.testing.assert_close(got, want, **tolerance(torch.float64))
    assert device[1].memory.store.index.stats().rows == host[1].memory.store.index.stats().rows


class _NoHostCopies(TorchDispatchMode):
    """Fails on a copy between the host and a device: on a GPU a blocking one syncs."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            source = args[0] if func is torch.ops.aten._to_copy.default else args[1]
            target = kwargs.get("device") or (args[0].device if func is torch.ops.aten.copy_.default else None)
            if target is not None and (source.device.type == "cpu") != (torch.device(target).type == "cpu"):
                raise AssertionError(f"{func} copies between {source.device} and {target}: a sync on a GPU")
        return func(*args, **kwargs)


SAM_AND_SDNC = ["SAM", "SDNC"]
MEMORIES = {"SAM": SAMMemory, "SDNC": SDNCMemory}


@pytest.mark.parametrize("name", SAM_AND_SDNC)
def test_a_step_never_reads_device_values_on_the_host(name):
    """Meta tensors have no values, and meta is not the host: every host read raises (.item(),
    .tolist(), nonzero, torch.unique, a boolean index, ...), and a host copy fails above."""
    memory = MEMORIES[name](1 << 12, 8, R, k=4).to("meta")
    with _NoHostCopies():
        for preloaded in (None, torch.randn(B, 1 << 12, 8, device="meta")):
            state = memory.init_state(B, preloaded)
            reads = []
            for t in range(3):
                part = torch.randn(B, memory.interface_size, device="meta", requires_grad=True)
                read, state = memory.step(state, part)
                reads.append(read)
                if t == 1:
                    state = state.reset(torch.arange(B, device="meta") != 1)
            torch.stack(reads).sum().backward()
            state = state.detach()
            with torch.no_grad():
                memory.step(state, torch.randn(B, memory.interface_size, device="meta"))


def test_a_sam_model_trains_without_reading_device_values_on_the_host():
    model = SAM(5, 16, num_slots=1 << 12, word_size=8, num_reads=R, k=4, output_size=3).to("meta")
    with _NoHostCopies():
        x = torch.randn(B, 4, 5, device="meta")
        y, state = model(x)
        state = state.reset(torch.arange(B, device="meta") == 0).detach()
        y2, _ = model(x, state)
        (y.square().mean() + y2.square().mean()).backward()


def test_captured_step_replays_the_eager_step(device_path):
    memory = SAMMemory(N, W, R, k=K)
    parts = interface_tensor(memory, T, dtype=torch.float32)
    eager, replayed = memory.init_state(B), memory.init_state(B)
    step = capture_step(memory, replayed)
    for part in parts:
        with torch.no_grad():
            want, eager = memory.step(eager, part)
        got = step(part)
        torch.testing.assert_close(got, want, **tolerance(torch.float32))
    assert torch.equal(step.state.memory.store.dense(), eager.memory.store.dense())


@pytest.mark.gpu
@pytest.mark.parametrize("name", SAM_AND_SDNC)
def test_cuda_step_does_not_sync(name):
    memory = MEMORIES[name](1 << 16, 32, 4, k=8).cuda()
    state = memory.init_state(8)
    parts = [torch.randn(8, memory.interface_size, device="cuda", requires_grad=True) for _ in range(4)]
    reads, (read, state) = [], memory.step(state, parts[0])  # warm-up: lazy inits may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for part in parts[1:]:
            read, state = memory.step(state, part)
            reads.append(read)
        state = state.reset(torch.tensor([True] + [False] * 7, device="cuda"))
        read, state = memory.step(state, parts[0].detach())
        reads.append(read)
        torch.stack(reads).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_cuda_graph_of_a_sam_step_matches_eager():
    memory = SAMMemory(1 << 14, 32, 4, k=8).cuda()
    eager, replayed = memory.init_state(8), memory.init_state(8)
    step = capture_step(memory, replayed)
    g = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(5):
        part = torch.randn(8, memory.interface_size, device="cuda", generator=g)
        with torch.no_grad():
            want, eager = memory.step(eager, part)
        torch.testing.assert_close(step(part), want, **tolerance(torch.float32))
    assert torch.equal(step.state.memory.store.dense(), eager.memory.store.dense())
