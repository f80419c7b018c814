"""SAMMemory: sparse access memory (Rae et al. 2016) with O(R*K) reads and writes per step.

The step is reference/sam.py's sam_step_ref computed on gathered rows only: the write
touches J <= R*K + 1 rows (the rows read at t-1 plus the LRU row), the read K rows per
head found by a top-K search, and usage is an LRU (last-access stamps and an argmin over
blocks of them, memory/lru.py: a step never waits on the host). No [B, R, N] tensor is formed;
the memory is written in place through the journal of memory/journal.py.
"""

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from sparsemem import _checks, ops
from sparsemem._constants import DELTA
from sparsemem._profiling import region
from sparsemem.index import INDEXES
from sparsemem.memory.base import Memory, check_mask
from sparsemem.memory.dnc import oneplus
from sparsemem.memory.journal import JournaledMemory
from sparsemem.memory.lru import LRU, make_lru
from sparsemem.memory.row_store import RowStore
from sparsemem.memory.versions import Timeline, VersionRef

PAIRWISE_COMPARISONS = 4096
"""Up to this many entry pairs (B E^2) group_sum compares every pair, in three small ops and no
sort: 17 us against numpy's 31 at B = 32, E = 5 (SAM's write on train's copy task), even at
B = 8, E = 33, three times slower at E = 65."""


def group_sum(indices: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """Sum values over equal indices along the last dimension.

    indices [..., E] int64, values [..., E] -> (total [..., E]: each entry's group sum,
    first [..., E] bool: one entry per group, its first occurrence). Differentiable in values.
    """
    width = indices.shape[-1]
    if indices.numel() * width <= PAIRWISE_COMPARISONS:
        same = indices.unsqueeze(-1) == indices.unsqueeze(-2)  # [..., E, E]
        return (values.unsqueeze(-2) * same).sum(-1), ~same.tril(-1).any(-1)
    if _checks.on_host(indices.device):
        # A step's few dozen entries per batch row: the groups found in numpy (one unique over
        # all rows, each row's indices offset into a range of its own), the sums in one index_add.
        keys = indices.reshape(-1, width).numpy() + (np.arange(indices.numel() // max(width, 1)) << 32)[:, None]
        _, first_at, inverse = np.unique(keys.ravel(), return_index=True, return_inverse=True)
        first = np.zeros(indices.numel(), dtype=bool)
        first[first_at] = True
        inverse = torch.from_numpy(inverse.reshape(-1))
        sums = values.new_zeros(len(first_at)).index_add(0, inverse, values.reshape(-1))
        return sums.index_select(0, inverse).view(values.shape), torch.from_numpy(first).view(indices.shape)
    sorted_indices, order = indices.sort(dim=-1, stable=True)
    first_sorted = torch.ones_like(sorted_indices, dtype=torch.bool)
    first_sorted[..., 1:] = sorted_indices[..., 1:] != sorted_indices[..., :-1]
    group = first_sorted.long().cumsum(-1) - 1
    sums = torch.zeros_like(values).scatter_add(-1, group, values.gather(-1, order))
    total = torch.zeros_like(values).scatter(-1, order, sums.gather(-1, group))
    first = torch.zeros_like(first_sorted).scatter(-1, order, first_sorted)
    return total, first


@dataclass
class SparseWeights:
    """A sparse weighting: weights[..., k] on slot indices[..., k] (duplicate slots add up)."""

    indices: Tensor
    weights: Tensor

    def detach(self) -> "SparseWeights":
        return SparseWeights(self.indices, self.weights.detach())

    def dense(self, num_slots: int) -> Tensor:
        """[..., N] (O(N): for tests and plots)."""
        shape = (*self.indices.shape[:-1], num_slots)
        return self.weights.new_zeros(shape).scatter_add(-1, self.indices, self.weights)


@dataclass
class SAMInterface:
    """One step's controller output for SAM, split and squashed.

    keys [B, R, W], strengths [B, R] (>= 1), add [B, W], write_gate alpha [B] and
    interp_gate gamma [B] in [0, 1].
    """

    keys: Tensor
    strengths: Tensor
    add: Tensor
    write_gate: Tensor
    interp_gate: Tensor


@dataclass
class SAMState:
    """memory: the rows (written in place); usage: the LRU; read_weights [B, R, K] and
    write_weights [B, J] as (indices, weights); version: the version of the rows, LRU (and
    SDNC's links) this state names (memory/versions.py); step: steps since init_state.

    A value, like nn.LSTM's (h, c): stepping from it twice, or from an older state, first
    brings the storage back to its version (undoing what was written since), so it gives the
    same outputs and gradients each time; reset() returns a new state and leaves this one."""

    memory: JournaledMemory
    usage: LRU
    read_weights: SparseWeights
    write_weights: SparseWeights
    version: VersionRef
    step: int = 0

    @property
    def batch_size(self) -> int:
        return self.memory.store.batch

    @property
    def timeline(self) -> Timeline:
        return self.memory.store.timeline

    def advanced(self) -> "SAMState":
        """This state as the start of a step: the storage at its version, a new version begun
        for what the step writes, and views of the rows that continue its segment (or branch)."""
        version = self.timeline.branch(self.version.version)
        return replace(self, memory=self.memory.advance(), version=self.timeline.hold(version))

    def detach(self) -> "SAMState":
        """The same state cut from the graph (truncated BPTT); the rows stay where they are."""
        return replace(
            self,
            memory=self.memory.detached(),
            read_weights=self.read_weights.detach(),
            write_weights=self.write_weights.detach(),
        )

    def clone(self) -> "SAMState":
        """An independent copy: its own rows, index and LRU, so two branches can live at once
        without going back and forth; O(rows written) (a preloaded memory's N rows). A new
        BPTT segment: no gradient flows from the copy back into this state."""
        self.timeline.checkout(self.version.version)
        timeline = Timeline()
        return replace(
            self.detach(),
            memory=JournaledMemory(self.memory.store.copy(timeline)),
            usage=self.usage.copy(timeline),
            version=timeline.hold(timeline.head),
        )

    def reset(self, mask: Tensor) -> "SAMState":
        """A new state where samples with mask [B] True start afresh (initial memory, no access
        history); this one stays usable."""
        mask = check_mask(mask, self.batch_size)
        state = self.advanced()
        state.memory.reset(mask)
        state.usage.reset(mask)
        return replace(
            state, read_weights=_cleared(self.read_weights, mask), write_weights=_cleared(self.write_weights, mask)
        )


def kept(new: SparseWeights, old: SparseWeights, active: Tensor | None) -> SparseWeights:
    """new where active [B] is True, old elsewhere (padded steps leave a state unchanged). A
    state's first step may change the shape of a weighting; every row is active there."""
    if active is None or new.indices.shape != old.indices.shape:
        return new
    where = active.view(-1, *([1] * (new.indices.dim() - 1)))
    return SparseWeights(torch.where(where, new.indices, old.indices), torch.where(where, new.weights, old.weights))


def _cleared(weights: SparseWeights, mask: Tensor) -> SparseWeights:
    """The weighting of init_state (slot 0, weight 0) where mask [B] is True."""
    where = mask.view(-1, *([1] * (weights.indices.dim() - 1)))
    return SparseWeights(weights.indices.masked_fill(where, 0), weights.weights.masked_fill(where, 0))


class SAMMemory(Memory):
    """Sparse access memory: N slots of W, R read heads reading K slots each.

    Interface per step [B, R*W + R + W + 2]: read keys, read strengths (oneplus), add
    vector, write gate and interpolation gate (sigmoid).
    """

    state_type = SAMState
    read_width = 1
    """Entries per read head per K (SDNC reads 3K: backward, content, forward)."""
    sequence_max_slots: int | None = 16384
    """sm.SAM and sm.SDNC run a sequence's steps as one op (ops.sam_sequence, sdnc_sequence: a dense
    copy of the memory, and of an SDNC's link store; the recurrence and its backward in C++, the
    batch rows split over the threads) up to this many slots; above it, or None, the step loop,
    whose cost per step does not grow with N. The op's search is exact whatever the index (a scan
    of the written rows among a few thousand costs less than an index search): an approximate
    index gives the exact top K there. Measured on 2 cores (bench_sam: B 8, W 64, R 4, K 8, K_L 8,
    T 16, exact index, keep_freed_memory), forward+backward ms a step, step loop against op, SAM:
    a fresh memory 2^10 4.0 / 0.7, 2^13 3.9 / 1.5, 2^14 4.3 / 3.4, 2^15 4.1 / 5.5 (the op's O(N)
    copies and scan a call); every slot written (preloaded) 2^14 8.4 / 6.6, 2^15 12.5 / 12.0.
    SDNC: fresh 2^10 8.7 / 1.4, 2^13 9.9 / 3.7, 2^14 9.4 / 6.3, 2^15 8.8 / 10.2; written 2^14
    14.6 / 10.3, 2^15 19.5 / 16.9."""

    def __init__(self, num_slots: int, word_size: int, num_reads: int, k: int = 8, index: str = "exact") -> None:
        super().__init__(num_slots, word_size, num_reads)
        if not isinstance(k, int) or not 1 <= k <= num_slots:
            raise ValueError(f"k must be in [1, N={num_slots}]; got k={k}")
        if index not in INDEXES:
            raise ValueError(f"index must be one of {', '.join(INDEXES)}; got {index!r}")
        self.k, self.index = k, index
        # Every unwritten slot holds this word (zero: cosine 0 with any key).
        self.register_buffer("initial_word", torch.zeros(word_size), persistent=False)

    @property
    def interface_size(self) -> int:
        return self.num_reads * self.word_size + self.num_reads + self.word_size + 2

    def split_interface(self, interface: Tensor) -> SAMInterface:
        R, W = self.num_reads, self.word_size
        keys, strengths, add, gates = interface.split([R * W, R, W, 2], dim=-1)
        gates = torch.sigmoid(gates)
        return SAMInterface(keys.view(-1, R, W), oneplus(strengths), add, gates[:, 0], gates[:, 1])

    def state_sizes(self) -> dict[str, int]:
        return {**super().state_sizes(), "K": self.k}

    def runs_as_one_op(self) -> bool:
        """Whether sm.SAM may run a sequence's steps as one ops.sam_sequence: at most
        sequence_max_slots slots (it copies all N rows a call)."""
        limit = self.sequence_max_slots
        return limit is not None and self.num_slots <= limit

    def sizes_of(self, state: SAMState) -> dict[str, int]:
        store, (heads, width) = state.memory.store, state.read_weights.indices.shape[1:]
        return {"N": store.num_slots, "W": store.word_size, "R": heads, "K": width // self.read_width}

    def init_interface_bias(self, bias: Tensor) -> None:
        """Set the bias of the controller's interface layer (bias [interface_size], in place)
        so that training starts with strong writes to the least recently used row (write gate
        alpha = sigmoid(3) = 0.95, interpolation gamma = sigmoid(-3) = 0.05) and sharp reads
        (strength oneplus(3) = 4.05) instead of alpha = gamma = 0.5 and strength 1.7.

        Why: at gamma = 0.5 half of every write lands on the rows read at t-1, which early in
        training are arbitrary, and smears over the items already stored; new items belong in
        a fresh row, which is where the LRU write puts them (bench/results/learning/README.md, sam-copy).
        """
        R, W = self.num_reads, self.word_size
        with torch.no_grad():
            bias[R * W : R * W + R] = 3.0  # read strengths
            bias[R * W + R + W] = 3.0  # write gate alpha
            bias[R * W + R + W + 1] = -3.0  # interpolation gamma: the LRU row, not the rows read

    def init_state(
        self,
        batch: int,
        memory: Tensor | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> SAMState:
        """A fresh memory (every slot the initial word), or memory [B, N, W] (or [N, W], shared
        by the batch) with every row written. With requires_grad, memory receives a gradient."""
        initial_rows = self.initial_memory(batch, memory, device, dtype)
        store = self.row_store(batch, self.num_slots, initial_rows, device, dtype)
        usage = make_lru(batch, self.num_slots, store.initial_word.device, store.timeline)
        return self.start_state(store, JournaledMemory(store, initial_rows), usage)

    def row_store(
        self,
        batch: int,
        num_slots: int,
        initial_rows: Tensor | None,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> RowStore:
        """num_slots rows of the initial word (or initial_rows [B, num_slots, W]) on a new timeline."""
        like = initial_rows if initial_rows is not None else self.initial_word
        word = self.initial_word.to(device=device or like.device, dtype=dtype or like.dtype)
        store = RowStore(batch, num_slots, word, initial_rows, self.index)
        store.timeline = Timeline()  # after the preload: it is every version's start
        return store

    def start_state(self, store: RowStore, memory: object, usage: LRU) -> SAMState:
        """A state of self.state_type: `memory` and `usage`, views of `store` (on its timeline), with
        nothing read or written yet, holding the timeline's head."""
        B, word = store.batch, store.initial_word
        zeros = torch.zeros(B, self.num_reads, self.k, dtype=word.dtype, device=word.device)
        slots = torch.zeros(B, self.num_reads, self.k, dtype=torch.int64, device=word.device)
        return self.state_type(
            memory=memory,
            usage=usage,
            read_weights=SparseWeights(slots, zeros),
            write_weights=SparseWeights(slots[:, 0, :1], zeros[:, 0, :1]),
            version=store.timeline.hold(store.timeline.head),
        )

    def write(
        self, state: SAMState, add: Tensor, write_gate: Tensor, interp_gate: Tensor, active: Tensor | None = None
    ) -> SparseWeights:
        """M_t = M (1 - I^U 1^T) + w^W a^T on the J rows read at t-1 plus the LRU row; batch rows
        where active [B] is False write nothing.

        Returns the write weights as J entries (a slot read by several heads appears
        several times; each entry carries its share).
        """
        batch = add.shape[0]
        lru = state.usage.least_recent().to(add.device).unsqueeze(-1)
        previous = state.read_weights
        slots = torch.cat([previous.indices.reshape(batch, -1), lru], dim=-1)  # [B, J]
        # w^W = alpha (gamma mean_r w^R_{t-1} + (1 - gamma) I^U), one entry per (head, k) and the LRU
        read_share = (write_gate * interp_gate).unsqueeze(-1) * previous.weights.reshape(batch, -1) / self.num_reads
        weights = torch.cat([read_share, (write_gate * (1 - interp_gate)).unsqueeze(-1)], dim=-1)
        total, first = group_sum(slots, weights)
        state.memory.write(slots, total, add, slots == lru, first, active)
        return SparseWeights(slots, weights)

    def content_read(self, state: SAMState, keys: Tensor, strengths: Tensor) -> tuple[SparseWeights, Tensor]:
        """Top-K search, then sparsemem.ops.sparse_read over the gathered rows (softmax over K)."""
        batch = keys.shape[0]
        slots = state.memory.store.search(keys, self.k)  # [B, R, K]
        rows = state.memory.gather(slots.reshape(batch, -1))  # [B, R*K, W]
        weights, reads = ops.sparse_read(rows, self.read_places(batch, keys.device), keys, strengths)
        return SparseWeights(slots, weights), reads

    def read_places(self, batch: int, device: torch.device) -> Tensor:
        """Where head r's K content rows sit among a step's gathered rows: [B, R, K] int64 (made
        once per batch size and device: a step would spend more making it than reading with it).
        SAM gathers head r's rows at r K ... r K + K - 1; SDNC (read_width 3) at r 3K + K ... r 3K + 2K - 1."""
        key = (batch, str(device))
        cache = {} if torch.compiler.is_compiling() else self.__dict__.setdefault("_read_places", {})
        if key not in cache:
            heads, k, width = self.num_reads, self.k, self.read_width
            first = torch.arange(heads, device=device).view(heads, 1) * width * k + (width // 2) * k
            cache[key] = (first + torch.arange(k, device=device)).expand(batch, -1, -1)
        return cache[key]

    def record_access(
        self, state: SAMState, write_w: SparseWeights, read_w: SparseWeights, active: Tensor | None = None
    ) -> None:
        """Slots with w^W(i) + sum_r w^R_r(i) > DELTA become the most recently used (in the
        batch rows where active [B] is True)."""
        batch = write_w.indices.shape[0]
        slots = torch.cat([write_w.indices, read_w.indices.reshape(batch, -1)], dim=-1)
        weights = torch.cat([write_w.weights, read_w.weights.reshape(batch, -1)], dim=-1).detach()
        total, first = group_sum(slots, weights)
        accessed = first & (total > DELTA)
        state.usage.touch(slots, accessed if active is None else accessed & active.unsqueeze(-1))

    def step(
        self, state: SAMState, interface: Tensor | SAMInterface, active: Tensor | None = None
    ) -> tuple[Tensor, SAMState]:
        """One SAM step (reference/sam.py's order): -> (reads [B, R, W], state)."""
        parts = interface if isinstance(interface, SAMInterface) else self.split_interface(interface)
        previous, state = state, state.advanced()
        with region("memory.write"):
            write_w = self.write(state, parts.add, parts.write_gate, parts.interp_gate, active)
        with region("memory.read"):
            read_w, reads = self.content_read(state, parts.keys, parts.strengths)
        with region("memory.lru"):
            self.record_access(state, write_w, read_w, active)
        read_w, write_w = kept(read_w, previous.read_weights, active), kept(write_w, previous.write_weights, active)
        return reads, replace(state, read_weights=read_w, write_weights=write_w, step=state.step + 1)


class CapturedStep:
    """SAM steps replayed from one CUDA graph: capture_step's result.

    step(interface [B, R*W + R + W + 2]) -> reads [B, R, W], a static buffer that the next
    call overwrites (clone it to keep it). `state` is the state after the last call: its
    memory, LRU and read weights advance in place; its write weights are the graph's output.
    A replay records nothing for going back (no Python runs), so the capture seals the
    memory's timeline: states older than the capture can no longer be stepped from (they are
    refused with a message), and `state` names the version the replays keep changing.
    """

    def __init__(self, module: SAMMemory, state: SAMState) -> None:
        self.module, self.state = module, state
        batch = state.batch_size
        device, dtype = state.read_weights.weights.device, state.read_weights.weights.dtype
        self._interface = torch.zeros(batch, module.interface_size, device=device, dtype=dtype)
        self._graph = None
        if device.type == "cuda":
            # Warm up (lazy initialisation, cuBLAS workspaces) on a scratch state of the same
            # shapes: capturing records kernels without running them, warming up runs them.
            scratch = module.init_state(batch, device=device, dtype=dtype)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.no_grad():
                for _ in range(2):
                    scratch = self._advance(scratch)[1]
            torch.cuda.current_stream().wait_stream(stream)
            self._graph = torch.cuda.CUDAGraph()
            with state.timeline.paused(), torch.cuda.graph(self._graph), torch.no_grad():
                self._reads, stepped = self._advance(state)
            self.state = replace(stepped, read_weights=state.read_weights)
            self._write_weights = stepped.write_weights
            state.timeline.seal()

    def _advance(self, state: SAMState) -> tuple[Tensor, SAMState]:
        """One step that leaves the read weights where the next step reads them (in place)."""
        reads, new = self.module.step(state, self._interface)
        state.read_weights.indices.copy_(new.read_weights.indices)
        state.read_weights.weights.copy_(new.read_weights.weights)
        return reads, new

    def __call__(self, interface: Tensor) -> Tensor:
        self._interface.copy_(interface)
        if self._graph is None:  # nothing to capture off CUDA: the same step, eagerly
            with torch.no_grad():
                reads, self.state = self.module.step(self.state, self._interface)
            return reads
        self._graph.replay()
        self.state = replace(self.state, write_weights=self._write_weights, step=self.state.step + 1)
        return self._reads


def capture_step(memory: SAMMemory, state: SAMState) -> CapturedStep:
    """Capture one no-grad SAM step on `state` in a CUDA graph (opt-in): each call replays it,
    launching the step's kernels at once instead of op by op from Python.

    Needs the exact index (a faiss index searches on the host) and SAMMemory itself (SDNC's
    link rows grow with the slots touched, and a graph replays fixed shapes). Off CUDA it
    runs the same step eagerly. state must not be stepped by other code afterwards.
    """
    if type(state) is not SAMState:
        raise ValueError(f"capture_step captures SAMMemory steps; got a {type(state).__name__}")
    if memory.index != "exact":
        raise ValueError(f"capture_step needs index='exact' (a faiss index runs on the host); got {memory.index!r}")
    return CapturedStep(memory, state)
