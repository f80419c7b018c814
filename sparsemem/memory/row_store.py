"""The sparse memories' storage: lazy rows, written in place (DESIGN.md, "Lazy memory").

LazyRows keeps B*N rows in one flat buffer that is never initialised: a row is real once
written, every other row reads as the shared initial word. torch.empty does not touch its
pages, so a fresh memory of a million slots costs what its written rows cost (on huge pages,
sparsemem/_malloc.py: the 2 MiB pages around them), and a reset clears only the rows written
since. Row id b*N + s addresses slot s of batch row b.

RowStore is the memory's rows plus the index that searches them; SDNC's LinkStore
(memory/sdnc.py) keeps its link rows on the same LazyRows.
"""

import weakref
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from sparsemem import _checks
from sparsemem._malloc import huge_pages
from sparsemem.index import make_index
from sparsemem.memory.versions import Change, Timeline
from sparsemem.ops.journaled_write import journaled_write


class LazyRows:
    """B*N rows of W (plus `spare_rows` after them), each written row real, every other one
    `initial_word`.

    written [B*N + spare_rows] bool marks the written rows; a spare row is never marked, so it
    reads as the initial word whatever is stored in it. On the host the row ids written since
    the last reset are kept, so a reset costs O(rows written); on a device that bookkeeping
    would sync every write, so a reset is one masked fill of the written mask instead.
    A preloaded batch row counts as written everywhere until its next reset.

    timeline: where every write and reset is recorded with what it overwrote, so a state can
    take the rows back to its version (memory/versions.py); None records nothing.
    """

    timeline: Timeline | None = None

    def __init__(self, batch: int, num_slots: int, initial_word: Tensor, spare_rows: int = 0) -> None:
        self.batch, self.num_slots, self.word_size = batch, num_slots, initial_word.shape[-1]
        self.initial_word = initial_word
        self.on_host = _checks.on_host(initial_word.device)
        rows = batch * num_slots + spare_rows
        # huge pages: the rows are read and written a few at a time all over (sparsemem/_malloc.py)
        self.rows = huge_pages(torch.empty(rows, self.word_size, dtype=initial_word.dtype, device=initial_word.device))
        self.written = torch.zeros(rows, dtype=torch.bool, device=initial_word.device)
        self._fresh_log: list[Tensor] = []
        self._preloaded = [False] * batch

    def read(self, row_ids: Tensor) -> Tensor:
        """row_ids [M] -> rows [M, W], the initial word where a row was never written."""
        # index_select, not rows[row_ids]: a plain gather along dim 0 costs a fraction of advanced indexing
        written = self.written.index_select(0, row_ids).unsqueeze(-1)
        return torch.where(written, self.rows.index_select(0, row_ids), self.initial_word)

    def write(self, row_ids: Tensor, rows: Tensor) -> None:
        """rows [M, W] into row_ids [M] in place; duplicate ids must carry identical rows."""
        self._record(lambda: _Rewrite(self, row_ids, rows))
        self._put(row_ids, rows)

    def _record(self, change: Callable[[], Change]) -> None:
        """Record change() on the timeline; made only when there is one (it copies what it overwrites)."""
        if self.timeline is not None:
            self.timeline.record(change())

    def _put(self, row_ids: Tensor, rows: Tensor) -> None:
        if not self.on_host:
            self.rows[row_ids] = rows
            self.written[row_ids] = row_ids < self.batch * self.num_slots
            return
        # index_copy_, not rows[row_ids] = rows: duplicate ids carry identical rows, and the plain
        # copy along dim 0 costs a fraction of an index_put; the written flags in numpy
        self.rows.index_copy_(0, row_ids, rows.to(self.rows.dtype))
        ids, written = row_ids.numpy(), self.written.numpy()
        fresh = np.unique(ids[(ids < self.batch * self.num_slots) & ~written[ids]])
        written[fresh] = True
        self._log_fresh(torch.from_numpy(fresh))

    def _log_fresh(self, row_ids: Tensor) -> None:
        """Log row_ids [M] written for the first time since the last reset (distinct)."""
        if row_ids.numel():
            self._fresh_log.append(row_ids)

    def _mark_all_written(self) -> None:
        """Every row written (a preloaded memory): what the next reset of a batch row clears."""
        self.written[: self.batch * self.num_slots] = True
        self._fresh_log = []
        self._preloaded = [True] * self.batch

    def written_row_ids(self, batch_rows: list[int]) -> Tensor:
        """The row ids written since the last reset in the given batch rows (host only)."""
        device = self.written.device
        row_ids = torch.cat([torch.empty(0, dtype=torch.int64, device=device), *self._fresh_log])
        selected = torch.zeros(self.batch, dtype=torch.bool, device=device)
        selected[batch_rows] = True
        N = self.num_slots
        preloaded = [torch.arange(b * N, (b + 1) * N) for b in batch_rows if self._preloaded[b]]
        return torch.cat([row_ids[selected[row_ids // N]], *preloaded])

    def copy(self, timeline: Timeline) -> "LazyRows":
        """A store of its own holding this one's written rows (O(rows written)), on `timeline`."""
        copy = self._empty_like()
        row_ids = self.written[: self.batch * self.num_slots].nonzero().flatten()
        copy._put(row_ids, self.rows[row_ids])
        copy.timeline = timeline
        return copy

    def _empty_like(self) -> "LazyRows":
        return LazyRows(self.batch, self.num_slots, self.initial_word, len(self.written) - self.batch * self.num_slots)

    def _restore(self, row_ids: Tensor, rows: Tensor, written: Tensor) -> None:
        """Put back rows [M, W] and their written flags [M] at row_ids [M] (an undo)."""
        self.rows[row_ids] = rows
        self.written[row_ids] = written

    def forget(self, mask: Tensor) -> None:
        """Batch rows where mask [B] bool is True back to the initial word everywhere."""
        self._record(lambda: _Forget(self, mask))
        self._forget(mask)

    def _forget(self, mask: Tensor) -> None:
        if not self.on_host:
            written = self.written[: self.batch * self.num_slots].view(self.batch, self.num_slots)
            written.masked_fill_(mask.to(written.device).unsqueeze(-1), False)
            return
        batch_rows = mask.nonzero().flatten().tolist()
        self.written[self.written_row_ids(batch_rows)] = False
        if self._fresh_log:
            remaining = torch.cat(self._fresh_log)
            self._fresh_log = [remaining[self.written[remaining]]]
        for b in batch_rows:
            self._preloaded[b] = False

    def _unforget(self, change: "_Forget") -> Tensor:
        """Undo a reset: its rows written again (they were never overwritten in the buffer: any
        write since was undone first). -> the row ids written again."""
        if change.row_ids is None:  # device: put back the reset batch rows' written mask (this syncs)
            written = self.written[: self.batch * self.num_slots].view(self.batch, self.num_slots)
            kept = change.written.view(self.batch, self.num_slots)
            written.copy_(torch.where(change.mask.unsqueeze(-1), kept, written))
            return (kept & change.mask.unsqueeze(-1)).flatten().nonzero().flatten()
        self.written[change.row_ids] = True
        self._log_fresh(change.row_ids)
        for b, preloaded in change.preloaded.items():
            self._preloaded[b] = preloaded
        return change.row_ids


class _Rewrite:
    """Rows written at row_ids [M]: undo puts back the rows and written flags they replaced
    (the buffer's own contents, so a row hidden by a reset comes back with the reset's undo)."""

    def __init__(self, store: LazyRows, row_ids: Tensor, rows: Tensor | None) -> None:
        self.store, self.row_ids, self.new_rows = weakref.proxy(store), row_ids, rows  # versions.py: no cycle
        self.old_rows, self.old_written = store.rows.index_select(0, row_ids), store.written.index_select(0, row_ids)
        self.rows = row_ids.numel()

    def undo(self) -> None:
        self.store._restore(self.row_ids, self.old_rows, self.old_written)

    def redo(self) -> None:
        self.store._put(self.row_ids, self.new_rows)


class _Forget:
    """A reset of the batch rows where mask [B] is True: undo marks its rows written again, in
    O(rows written) on the host (on a device, the reset rows' written mask is kept whole)."""

    def __init__(self, store: LazyRows, mask: Tensor) -> None:
        self.store, self.mask = weakref.proxy(store), mask  # versions.py: no cycle
        self.row_ids: Tensor | None = None
        if store.on_host:
            batch_rows = mask.nonzero().flatten().tolist()
            row_ids = store.written_row_ids(batch_rows)
            self.row_ids = row_ids[store.written[row_ids]]  # the log may name rows an undo unwrote
            self.preloaded = {b: store._preloaded[b] for b in batch_rows}
            self.rows = self.row_ids.numel()
        else:  # the whole mask, not its masked rows: selecting them would wait for the device
            self.written = store.written[: store.batch * store.num_slots].clone()
            self.rows = 0

    def undo(self) -> None:
        self.store._unforget(self)

    def redo(self) -> None:
        self.store._forget(self.mask)


class RowStore(LazyRows):
    """The rows of B memories of N slots of W, and the index that searches them.

    initial_rows [B, N, W] (optional) starts every slot as written (a preloaded memory, or the
    full regime of the benchmarks). index: a sparsemem.index name ("exact", "ivf", "faiss-hnsw",
    "faiss-ivf"); it holds the written rows and finds the top K over all N slots, unwritten
    ones included.
    """

    def __init__(
        self,
        batch: int,
        num_slots: int,
        initial_word: Tensor,
        initial_rows: Tensor | None = None,
        index: str = "exact",
    ) -> None:
        # The torch indexes live beside the memory (its device and dtype); faiss is CPU float32.
        torch_index = index in ("exact", "ivf")
        options = {"dtype": initial_word.dtype, "device": initial_word.device} if torch_index else {}
        # one spare row after the B*N: a padded batch row's writes land there, never read
        super().__init__(batch, num_slots, initial_word, spare_rows=1)
        self.spare = batch * num_slots
        self._moved_row_ids: list[Tensor] = []
        self.index_name = index
        self.index = make_index(index, batch, num_slots, self.word_size, initial=initial_word.detach(), **options)
        # row id = slot + offset: the row of slot s in batch row b is b*N + s
        self._offsets = torch.arange(batch, device=initial_word.device).unsqueeze(-1) * num_slots
        if initial_rows is not None:
            self.preload(lambda b, start, end: initial_rows[b, start:end].detach())

    def preload(self, rows: Callable[[int, int, int], Tensor], chunk: int = 1 << 16) -> None:
        """Write every slot, rows(b, start, end) -> [end - start, W] at a time, then index them all
        with one Index.load (the full regime): a memory of any size is filled in place with no
        second full copy, and the index is built once from all N rows (an approximate index
        trained on the final rows, not grown and retrained chunk by chunk), reading the memory
        a chunk at a time."""
        view = self.rows[: self.spare].view(self.batch, self.num_slots, self.word_size)
        for start in range(0, self.num_slots, chunk):
            end = min(start + chunk, self.num_slots)
            for b in range(self.batch):
                view[b, start:end] = rows(b, start, end)
        self.index.load(view)
        self._mark_all_written()

    def row_ids(self, slots: Tensor) -> Tensor:
        """slots [B, ...] -> row ids [B * ...]."""
        offsets = self._offsets.view(-1, *([1] * (slots.dim() - 1)))
        return (slots + offsets.to(slots.device)).reshape(-1)

    def _empty_like(self) -> "RowStore":
        return RowStore(self.batch, self.num_slots, self.initial_word, index=self.index_name)

    def _put(self, row_ids: Tensor, rows: Tensor) -> None:
        """rows [M, W] into row_ids [M] (M = B*J, J per batch row) in place, and into the index;
        duplicate ids must carry identical rows."""
        super()._put(row_ids, rows)
        if self._moved(row_ids):
            return
        real = row_ids < self.spare
        self.index.update_entries(row_ids[real] // self.num_slots, row_ids[real] % self.num_slots, rows[real])

    def _restore(self, row_ids: Tensor, rows: Tensor, written: Tensor) -> None:
        super()._restore(row_ids, rows, written)
        if not self._moved(row_ids):
            self._sync_index(row_ids)

    def _moved(self, row_ids: Tensor) -> bool:
        """Inside a timeline move (an undo or redo of many steps), note row_ids [M] for one index
        update at its end, from the rows as they then are, instead of one update per step undone
        (per-call index work is most of a step's undo). -> whether they were deferred."""
        if self.timeline is None or not self.timeline.moving:
            return False
        self._moved_row_ids.append(row_ids)
        self.timeline.after_move(self, self._sync_moved)
        return True

    def _sync_moved(self) -> None:
        row_ids, self._moved_row_ids = torch.cat(self._moved_row_ids).unique(), []
        self._sync_index(row_ids)

    def _sync_index(self, row_ids: Tensor) -> None:
        """The index at row_ids [M] as the rows are: a written row's contents, an unwritten one forgotten."""
        row_ids = row_ids[row_ids < self.spare]
        written = self.written[row_ids]
        batch, slots = row_ids // self.num_slots, row_ids % self.num_slots
        self.index.update_entries(batch[written], slots[written], self.rows[row_ids[written]])
        self.index.forget(batch[~written], slots[~written])

    def sparse_write(
        self, slots: Tensor, weights: Tensor, add: Tensor, erase_rows: Tensor, active: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """new = old (1 - erase) + w add^T in place at slots [B, J]: weights [B, J], add [B, W],
        erase_rows [B, J] bool; a slot repeated in a batch row must carry the same weight and
        erase. -> (row ids [B, J], old rows, new rows [B, J, W]); an old row is the initial word
        where the slot was unwritten. Batch rows where active [B] is False (entries where an
        active [B, J] is: a sharded memory's slots another rank owns) write the spare row
        instead, which no slot reads and the index never sees."""
        row_ids = slots + self._offsets
        if active is not None:
            row_ids = torch.where(active.unsqueeze(-1) if active.dim() == 1 else active, row_ids, self.spare)
        change = _Rewrite(self, row_ids.view(-1), None) if self.timeline is not None else None
        old, new, fresh = journaled_write(self.rows, self.written, self.initial_word, row_ids, weights, add, erase_rows)
        if change is not None:
            change.new_rows = new.view(-1, self.word_size)
            self.timeline.record(change)
        if active is None:
            if self.on_host:
                self._log_fresh(torch.from_numpy(row_ids.numpy()[fresh.numpy()]))
            self.index.update(new, slots)
            return row_ids, old, new
        real = row_ids < self.spare
        if self.on_host:
            self._log_fresh(row_ids[fresh & real])
        self.index.update_entries(row_ids[real] // self.num_slots, slots[real], new[real])
        return row_ids, old, new

    def _forget(self, mask: Tensor) -> None:
        super()._forget(mask)
        self.index.reset(mask)

    def _unforget(self, change: _Forget) -> Tensor:
        row_ids = super()._unforget(change)
        if not self._moved(row_ids):
            self.index.update_entries(row_ids // self.num_slots, row_ids % self.num_slots, self.rows[row_ids])
        return row_ids

    def dense(self) -> Tensor:
        """The whole memory [B, N, W] (O(N): for tests and plots, never on the sparse path)."""
        return self.read(torch.arange(self.batch * self.num_slots, device=self.rows.device)).view(
            self.batch, self.num_slots, self.word_size
        )

    def search(self, keys: Tensor, k: int) -> Tensor:
        """The K slots most similar (cosine) to each key over all N: keys [B, R, W] -> slots [B, R, K]."""
        return self.index.search(keys.detach(), k)[1]
