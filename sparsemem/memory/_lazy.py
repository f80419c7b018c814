"""The sparse memories' storage: lazy rows, an in-place journaled autograd, the LRU.

LazyMemory keeps B*N rows of W in one flat buffer that is never initialised: a row is
real once written, every other slot reads as the shared initial word. torch.empty does
not touch its pages, so a fresh memory of a million slots costs what its written rows
cost, and reset clears only the rows written since (DESIGN.md, "Lazy memory").

JournaledMemory is one BPTT segment over a LazyMemory. Reads gather rows, writes change
rows in place, through autograd Functions chained by a "version token", so autograd runs
their backwards in exactly the reverse order of the forward:

    source -> gather -> write -> gather -> ... -> token held by the state

A write (SAM's: new = old (1 - erase) + w a^T on J rows) is one node and one kernel
(sparsemem.ops.sparse.journaled_write): it reads the rows it overwrites, keeps them as the
step's journal entry (J*W, saved by autograd; the journal proper holds only row ids), and
stores the new rows. Backward never reads the memory: it leaves the memory holding the
end-of-forward state, bit-identical to a forward-only run, and needs no undo/redo pass.
Gradients live in a row-keyed buffer (one row per slot the segment touched, never
[B, N, W]); a write's backward takes the gradient of the rows it wrote from it (zeroing
those rows: the old contents did not reach later steps), runs sparse_write's backward and
adds the old rows' gradient back; a gather's backward adds into it. scatter (rows computed
elsewhere, stored in place) is the general form of a write, used by SDNC's link rows. The
initial memory gets a gradient only when it was passed in with requires_grad. Under
no_grad nothing is recorded.
"""

from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from sparsemem import _backends, _checks
from sparsemem.index import make_index
from sparsemem.ops.sparse import journaled_write


def group_sum(indices: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """Sum values over equal indices along the last dimension.

    indices [..., E] int64, values [..., E] -> (total [..., E]: each entry's group sum,
    first [..., E] bool: one entry per group, the first in sorted order). Differentiable in values.
    """
    sorted_indices, order = indices.sort(dim=-1, stable=True)
    first_sorted = torch.ones_like(sorted_indices, dtype=torch.bool)
    first_sorted[..., 1:] = sorted_indices[..., 1:] != sorted_indices[..., :-1]
    group = first_sorted.long().cumsum(-1) - 1
    sums = torch.zeros_like(values).scatter_add(-1, group, values.gather(-1, order))
    total = torch.zeros_like(values).scatter(-1, order, sums.gather(-1, group))
    first = torch.zeros_like(first_sorted).scatter(-1, order, first_sorted)
    return total, first


class ListLRU:
    """Least recently used slot per batch row in O(1) per access (Rae et al.'s LRU list), on the host.

    Touched slots sit in an access-ordered dict; never-touched slots are all older than
    any touched one and come out in slot order from a cursor, so nothing is O(N).
    Ties (slots accessed in the same step) go to the lowest slot id, as in lru_ref.
    The CPU's LRU: every call reads its tensors on the host, which on a GPU would be a sync.
    """

    def __init__(self, batch: int, num_slots: int) -> None:
        self.num_slots = num_slots
        self.order: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(batch)]
        self.cursor = [0] * batch

    def least_recent(self) -> Tensor:
        """The least recently used slot of each batch row: [B] int64."""
        slots = []
        for b, order in enumerate(self.order):
            while self.cursor[b] < self.num_slots and self.cursor[b] in order:
                self.cursor[b] += 1
            slots.append(self.cursor[b] if self.cursor[b] < self.num_slots else next(iter(order)))
        return torch.tensor(slots, dtype=torch.int64)

    def touch(self, slots: Tensor, accessed: Tensor) -> None:
        """One step's accesses: slots [B, E] int64 where accessed [B, E] bool (duplicates allowed)."""
        for order, row, mask in zip(self.order, slots.tolist(), accessed.tolist(), strict=True):
            # ascending, so the lowest slot of a step is the oldest of that step
            for slot in sorted({s for s, a in zip(row, mask, strict=True) if a}):
                order[slot] = None
                order.move_to_end(slot)

    def reset(self, mask: Tensor) -> None:
        """Batch rows where mask [B] bool is True forget their accesses."""
        for b in mask.nonzero().flatten().tolist():
            self.order[b].clear()
            self.cursor[b] = 0


class TimestampLRU:
    """Least recently used slot per batch row with no host sync: a last-access step per slot and an argmin.

    last_access [B, N] int64 on the memory's device (0: never accessed, so unwritten and
    untouched slots are the oldest); argmin returns the first minimum, so ties go to the
    lowest slot id, as in lru_ref and ListLRU. O(N) per step, but one pass on the device
    instead of a round trip to the host. The clock is a device scalar, so a captured CUDA
    graph replays with the current time rather than the one seen at capture.
    """

    def __init__(self, batch: int, num_slots: int, device: torch.device | str) -> None:
        self.last_access = torch.zeros(batch, num_slots, dtype=torch.int64, device=device)
        self.clock = torch.zeros((), dtype=torch.int64, device=device)

    def least_recent(self) -> Tensor:
        """The least recently used slot of each batch row: [B] int64."""
        return self.last_access.argmin(dim=-1)

    def touch(self, slots: Tensor, accessed: Tensor) -> None:
        """One step's accesses: slots [B, E] int64 where accessed [B, E] bool (duplicates allowed)."""
        self.clock += 1
        # amax: a duplicated slot is stamped if any of its entries was accessed; 0 never lowers a stamp
        stamps = torch.where(accessed, self.clock, 0)
        self.last_access.scatter_reduce_(-1, slots, stamps, reduce="amax")

    def reset(self, mask: Tensor) -> None:
        """Batch rows where mask [B] bool is True forget their accesses."""
        self.last_access.masked_fill_(mask.unsqueeze(-1), 0)


LRU = ListLRU | TimestampLRU


def make_lru(batch: int, num_slots: int, device: torch.device) -> LRU:
    """ListLRU on the CPU (O(1) per access), TimestampLRU elsewhere (no host sync)."""
    if _checks.on_host(device):
        return ListLRU(batch, num_slots)
    return TimestampLRU(batch, num_slots, device)


class LazyMemory:
    """B*N rows of W, each written row real, every other slot the shared initial word.

    Flat keys b*N + slot address rows. memory [B, N, W] (optional) starts every row as
    written (a preloaded memory, or the full regime of the benchmarks). index: a
    sparsemem.index name ("exact", "ivf", "faiss-hnsw", "faiss-ivf"); it holds the written rows
    and finds the top K over all N slots, unwritten ones included. On the host the keys
    written since the last reset are kept, so a reset costs O(rows written); on a device
    that bookkeeping would sync every write, so a reset is one masked fill of the
    written mask [B*N] instead.
    """

    def __init__(
        self, batch: int, num_slots: int, initial_word: Tensor, memory: Tensor | None = None, index: str = "exact"
    ) -> None:
        self.batch, self.num_slots, self.word_size = batch, num_slots, initial_word.shape[-1]
        self.on_host = _checks.on_host(initial_word.device)
        self.initial_word = initial_word
        flat = (batch * num_slots, self.word_size)
        # The torch indexes live beside the memory (its device and dtype); faiss is CPU float32.
        torch_index = index in ("exact", "ivf")
        options = {"dtype": initial_word.dtype, "device": initial_word.device} if torch_index else {}
        self.index = make_index(index, batch, num_slots, self.word_size, initial=initial_word.detach(), **options)
        # Keys written since the last reset, so a reset costs O(rows written); a preloaded
        # batch row counts as written everywhere until its first reset.
        self._written_keys: list[Tensor] = []
        self._preloaded = [False] * batch
        # torch.empty leaves the pages untouched: only written rows ever take memory.
        self.rows = torch.empty(flat, dtype=initial_word.dtype, device=initial_word.device)
        self.written = torch.zeros(batch * num_slots, dtype=torch.bool, device=initial_word.device)
        # keys = slots + offsets: the flat key of slot s in batch row b is b*N + s
        self._offsets = torch.arange(batch, device=initial_word.device).unsqueeze(-1) * num_slots
        if memory is not None:
            self.preload(lambda b, start, end: memory[b, start:end].detach())

    def preload(self, rows: Callable[[int, int, int], Tensor], chunk: int = 1 << 16) -> None:
        """Write every slot, rows(b, start, end) -> [end - start, W] at a time, then index them all
        with one Index.load (the full regime): a memory of any size is filled in place with no
        second full copy, and the index is built once from all N rows (an approximate index
        trained on the final rows, not grown and retrained chunk by chunk), reading the memory
        a chunk at a time."""
        view = self.rows.view(self.batch, self.num_slots, self.word_size)
        for start in range(0, self.num_slots, chunk):
            end = min(start + chunk, self.num_slots)
            for b in range(self.batch):
                view[b, start:end] = rows(b, start, end)
        self.index.load(view)
        self.written.fill_(True)
        self._written_keys = []
        self._preloaded = [True] * self.batch

    def keys(self, slots: Tensor) -> Tensor:
        """slots [B, ...] -> flat keys [B * ...]."""
        offsets = self._offsets.view(-1, *([1] * (slots.dim() - 1)))
        return (slots + offsets.to(slots.device)).reshape(-1)

    def read(self, keys: Tensor) -> Tensor:
        """keys [M] -> rows [M, W], the initial word where a slot was never written."""
        return torch.where(self.written[keys].unsqueeze(-1), self.rows[keys], self.initial_word)

    def write(self, keys: Tensor, rows: Tensor) -> None:
        """rows [M, W] into keys [M] (M = B*J, J per batch row) in place; duplicate keys must
        carry identical rows."""
        if self.on_host:
            self._log_fresh(torch.unique(keys[~self.written[keys]]))
        self.rows[keys] = rows
        self.written[keys] = True
        self.index.update(rows.view(self.batch, -1, self.word_size), (keys % self.num_slots).view(self.batch, -1))

    def sparse_write(
        self, slots: Tensor, weights: Tensor, add: Tensor, erase_rows: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """new = old (1 - erase) + w add^T in place at slots [B, J]: weights [B, J], add [B, W],
        erase_rows [B, J] bool; a slot repeated in a batch row must carry the same weight and
        erase. -> (keys [B, J], old rows, new rows [B, J, W]); an old row is the initial word
        where the slot was unwritten."""
        keys = slots + self._offsets
        old, new, fresh = journaled_write(self.rows, self.written, self.initial_word, keys, weights, add, erase_rows)
        if self.on_host:
            self._log_fresh(keys[fresh])
        self.index.update(new, slots)
        return keys, old, new

    def _log_fresh(self, keys: Tensor) -> None:
        """Log keys [M] written for the first time since the last reset (distinct)."""
        if keys.numel():
            self._written_keys.append(keys)

    def written_keys(self, rows: list[int]) -> Tensor:
        """The flat keys written since the last reset in the given batch rows."""
        device = self.rows.device
        keys = torch.cat([torch.empty(0, dtype=torch.int64, device=device), *self._written_keys])
        selected = torch.zeros(self.batch, dtype=torch.bool, device=device)
        selected[rows] = True
        preloaded = [torch.arange(b * self.num_slots, (b + 1) * self.num_slots) for b in rows if self._preloaded[b]]
        return torch.cat([keys[selected[keys // self.num_slots]], *preloaded])

    def forget(self, mask: Tensor) -> None:
        """Batch rows where mask [B] bool is True back to the initial word everywhere."""
        if self.on_host:
            rows = mask.nonzero().flatten().tolist()
            keys = self.written_keys(rows)
            self.written[keys] = False
            if self._written_keys:
                remaining = torch.cat(self._written_keys)
                self._written_keys = [remaining[self.written[remaining]]]
            for b in rows:
                self._preloaded[b] = False
        else:
            written = self.written.view(self.batch, self.num_slots)
            written.masked_fill_(mask.to(written.device).unsqueeze(-1), False)
        self.index.reset(mask)

    def dense(self) -> Tensor:
        """The whole memory [B, N, W] (O(N): for tests and plots, never on the sparse path)."""
        return self.read(torch.arange(self.batch * self.num_slots, device=self.rows.device)).view(
            self.batch, self.num_slots, self.word_size
        )

    def search(self, keys: Tensor, k: int) -> Tensor:
        """The K slots most similar (cosine) to each key over all N: keys [B, R, W] -> slots [B, R, K]."""
        return self.index.search(keys.detach(), k)[1]


class Journal:
    """A segment's touched row ids and, during backward, the row-keyed gradient buffer."""

    def __init__(self, store: LazyMemory) -> None:
        self.store = store
        self._logged: list[Tensor] = []
        self._keys: Tensor | None = None
        self._grad: Tensor | None = None
        self._task = -1

    def log(self, keys: Tensor) -> None:
        self._logged.append(keys)

    def _in_pass(self) -> bool:
        # One buffer per backward pass: a pass that skips the source (autograd.grad with
        # inputs that do not need it) must not leave its gradients to the next pass.
        return self._grad is not None and self._task == torch._C._current_graph_task_id()

    def positions(self, keys: Tensor, dtype: torch.dtype) -> Tensor:
        """Where the gradient of keys [M] lives in this pass's buffer (made on the pass's first call)."""
        on_host = _checks.on_host(keys.device)
        if not self._in_pass():
            self._task = torch._C._current_graph_task_id()
            logged = torch.cat(self._logged)
            # Sorted; on a device duplicates are kept (a key's row is its first occurrence,
            # searchsorted left, the rest stay zero), since torch.unique must sync for its size.
            # On the host numpy's sorts are several times faster than torch's on these sizes.
            self._keys = torch.from_numpy(np.unique(logged.numpy())) if on_host else logged.sort().values
            self._grad = torch.zeros(len(self._keys), self.store.word_size, dtype=dtype, device=keys.device)
        if on_host:
            return torch.from_numpy(np.searchsorted(self._keys.numpy(), keys.numpy()))
        return torch.searchsorted(self._keys, keys)

    def buffer(self) -> Tensor:
        """This pass's gradient buffer [P, W] (after positions())."""
        return self._grad

    def accumulate(self, positions: Tensor, grad: Tensor) -> None:
        """Add grad [M, W] at positions [M] (from positions())."""
        self._grad.index_add_(0, positions, grad)

    def take(self, positions: Tensor, first: Tensor) -> Tensor:
        """The gradient of rows just written at positions [M], once per distinct key (where first
        [M] is True, zero elsewhere); those rows' buffer is zeroed."""
        grad = self._grad[positions] * first.unsqueeze(-1)
        self._grad.index_fill_(0, positions, 0)
        return grad

    def clear(self, mask: Tensor) -> None:
        """Drop the gradient gathered so far for every slot of the batch rows where mask [B] is True."""
        if self._in_pass():
            batch, slots = self.store.batch, self.store.num_slots
            # keys past the B*N slots (a store's spare row for dropped writes) belong to no batch row
            owned = self._keys < batch * slots
            rows = mask.to(self._keys.device)[(self._keys // slots).clamp(max=batch - 1)] & owned
            self._grad.masked_fill_(rows.unsqueeze(-1), 0)

    def finish(self) -> tuple[Tensor | None, Tensor | None]:
        """(keys, grad) left for the initial memory; the buffer is dropped."""
        keys, grad = self._keys, self._grad
        self._keys = self._grad = None
        return keys, grad


class _Source(torch.autograd.Function):
    """The first version token of a segment; its backward runs last and ends the segment's pass."""

    @staticmethod
    def forward(ctx, journal: Journal, anchor: Tensor) -> Tensor:
        ctx.journal = journal
        ctx.anchor_shape = anchor.shape
        return anchor.new_empty(0)

    @staticmethod
    def backward(ctx, _grad_token: Tensor):
        keys, grad = ctx.journal.finish()
        if not ctx.needs_input_grad[1] or len(ctx.anchor_shape) != 3:
            return None, None
        store = ctx.journal.store
        dense = grad.new_zeros(store.batch * store.num_slots, store.word_size)
        if keys is not None:
            dense.index_add_(0, keys, grad)  # a repeated key's extra rows hold zeros
        return None, dense.view(ctx.anchor_shape)


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, journal: Journal, token: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
        ctx.journal = journal
        ctx.save_for_backward(keys)
        journal.log(keys)
        return journal.store.read(keys), token.new_empty(0)

    @staticmethod
    def backward(ctx, grad_rows: Tensor, _grad_token: Tensor):
        (keys,) = ctx.saved_tensors
        ctx.journal.accumulate(ctx.journal.positions(keys, grad_rows.dtype), grad_rows)
        return None, None, None


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, journal: Journal, token: Tensor, keys: Tensor, rows: Tensor, first: Tensor) -> Tensor:
        ctx.journal = journal
        ctx.save_for_backward(keys, first)
        journal.log(keys)
        journal.store.write(keys, rows.detach())
        return token.new_empty(0)

    @staticmethod
    def backward(ctx, _grad_token: Tensor):
        keys, first = ctx.saved_tensors
        journal = ctx.journal
        return None, None, None, journal.take(journal.positions(keys, journal.store.rows.dtype), first), None


class _Write(torch.autograd.Function):
    """A step's write in one node: new = old (1 - erase) + w a^T in place (LazyMemory.sparse_write),
    the old rows kept for backward. Backward, by the kernel of the backend that ran the forward:
    the written rows' gradient taken from the buffer (and zeroed there), through the write, the
    old rows' gradient added back, at positions found once."""

    @staticmethod
    def forward(ctx, journal: Journal, token: Tensor, slots: Tensor, weights: Tensor, add: Tensor, erase_rows, first):
        store = journal.store
        ctx.journal = journal
        ctx.kernel = _backends.kernel("journaled_write", store.rows.device)
        keys, old, new = store.sparse_write(slots, weights, add, erase_rows)
        journal.log(keys.view(-1))
        ctx.save_for_backward(keys, first, old, weights, add, erase_rows, new)
        return token.new_empty(0)

    @staticmethod
    def backward(ctx, _grad_token: Tensor):
        keys, first, old, weights, add, erase_rows, new = ctx.saved_tensors
        journal = ctx.journal
        positions = journal.positions(keys.view(-1), old.dtype).view_as(keys)
        grad_weights, grad_add = ctx.kernel.backward(
            journal.buffer(), positions, first, old, weights, add, erase_rows, new
        )
        return None, None, None, grad_weights, grad_add, None, None


class _Reset(torch.autograd.Function):
    """A reset in the version chain: its backward drops the gradient gathered for the reset batch
    rows, so nothing read after the reset reaches what was written before it."""

    @staticmethod
    def forward(ctx, journal: Journal, token: Tensor, mask: Tensor) -> Tensor:
        ctx.journal, ctx.mask = journal, mask
        return token.new_empty(0)

    @staticmethod
    def backward(ctx, _grad_token: Tensor):
        ctx.journal.clear(ctx.mask)
        return None, None, None


class JournaledMemory:
    """One BPTT segment over a LazyMemory: differentiable gather and in-place scatter of rows.

    initial: the memory passed to init_state; with requires_grad it receives the gradient
    of the rows the segment read before overwriting them (dense, as the user asked for it).
    """

    def __init__(self, store: LazyMemory, initial: Tensor | None = None) -> None:
        self.store = store
        self.journal = Journal(store)
        self._initial = initial if initial is not None and initial.requires_grad else None
        self._token: Tensor | None = None

    def token(self) -> Tensor:
        if self._token is None:
            anchor = self._initial
            if anchor is None:
                anchor = torch.zeros((), dtype=self.store.rows.dtype, requires_grad=True)
            self._token = _Source.apply(self.journal, anchor)
        return self._token

    def gather(self, slots: Tensor) -> Tensor:
        """slots [B, Q] -> rows [B, Q, W]."""
        keys = self.store.keys(slots)
        if torch.is_grad_enabled():
            rows, self._token = _Gather.apply(self.journal, self.token(), keys)
        else:
            rows = self.store.read(keys)
        return rows.view(*slots.shape, self.store.word_size)

    def scatter(self, slots: Tensor, rows: Tensor, first: Tensor) -> None:
        """rows [B, J, W] into slots [B, J] in place; first [B, J] marks one entry per distinct slot
        (duplicates must carry identical rows)."""
        keys = self.store.keys(slots)
        flat_rows = rows.reshape(-1, self.store.word_size)
        if torch.is_grad_enabled():
            self._token = _Scatter.apply(self.journal, self.token(), keys, flat_rows, first.reshape(-1))
        else:
            self.store.write(keys, flat_rows)

    def write(self, slots: Tensor, weights: Tensor, add: Tensor, erase_rows: Tensor, first: Tensor) -> None:
        """new = old (1 - erase) + w add^T in place on slots [B, J]: weights [B, J], add [B, W],
        erase_rows [B, J] bool; first [B, J] marks one entry per distinct slot (a repeated slot
        must carry the same weight and erase: its entries store one row)."""
        if torch.is_grad_enabled():
            self._token = _Write.apply(self.journal, self.token(), slots, weights, add, erase_rows, first)
        else:
            self.store.sparse_write(slots, weights, add, erase_rows)

    def detached(self) -> "JournaledMemory":
        """The same rows, a new segment: no gradient flows to what came before."""
        return JournaledMemory(self.store)

    def reset(self, mask: Tensor) -> None:
        """Batch rows where mask [B] bool is True back to the initial word; under grad no
        gradient crosses the reset."""
        if torch.is_grad_enabled():
            self._token = _Reset.apply(self.journal, self.token(), mask)
        self.store.forget(mask)
