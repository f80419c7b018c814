"""The sparse memories' storage: lazy rows, written in place (DESIGN.md, "Lazy memory").

LazyRows keeps B*N rows in one flat buffer that is never initialised: a row is real once
written, every other row reads as the shared initial word. torch.empty does not touch its
pages, so a fresh memory of a million slots costs what its written rows cost, and a reset
clears only the rows written since. Row id b*N + s addresses slot s of batch row b.

RowStore is the memory's rows plus the index that searches them; SDNC's LinkStore
(memory/sdnc.py) keeps its link rows on the same LazyRows.
"""

from collections.abc import Callable

import torch
from torch import Tensor

from sparsemem import _checks
from sparsemem.index import make_index
from sparsemem.ops.sparse import journaled_write


class LazyRows:
    """B*N rows of W (plus `spare_rows` after them), each written row real, every other one
    `initial_word`.

    written [B*N + spare_rows] bool marks the written rows; a spare row is never marked, so it
    reads as the initial word whatever is stored in it. On the host the row ids written since
    the last reset are kept, so a reset costs O(rows written); on a device that bookkeeping
    would sync every write, so a reset is one masked fill of the written mask instead.
    A preloaded batch row counts as written everywhere until its next reset.
    """

    def __init__(self, batch: int, num_slots: int, initial_word: Tensor, spare_rows: int = 0) -> None:
        self.batch, self.num_slots, self.word_size = batch, num_slots, initial_word.shape[-1]
        self.initial_word = initial_word
        self.on_host = _checks.on_host(initial_word.device)
        rows = batch * num_slots + spare_rows
        self.rows = torch.empty(rows, self.word_size, dtype=initial_word.dtype, device=initial_word.device)
        self.written = torch.zeros(rows, dtype=torch.bool, device=initial_word.device)
        self._fresh_log: list[Tensor] = []
        self._preloaded = [False] * batch

    def read(self, row_ids: Tensor) -> Tensor:
        """row_ids [M] -> rows [M, W], the initial word where a row was never written."""
        return torch.where(self.written[row_ids].unsqueeze(-1), self.rows[row_ids], self.initial_word)

    def write(self, row_ids: Tensor, rows: Tensor) -> None:
        """rows [M, W] into row_ids [M] in place; duplicate ids must carry identical rows."""
        self.rows[row_ids] = rows
        real = row_ids < self.batch * self.num_slots
        if not self.on_host:
            self.written[row_ids] = real
            return
        fresh = torch.unique(row_ids[real & ~self.written[row_ids]])
        self.written[fresh] = True
        self._log_fresh(fresh)

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

    def forget(self, mask: Tensor) -> None:
        """Batch rows where mask [B] bool is True back to the initial word everywhere."""
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
        super().__init__(batch, num_slots, initial_word)
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
        view = self.rows.view(self.batch, self.num_slots, self.word_size)
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

    def write(self, row_ids: Tensor, rows: Tensor) -> None:
        """rows [M, W] into row_ids [M] (M = B*J, J per batch row) in place, and into the index;
        duplicate ids must carry identical rows."""
        super().write(row_ids, rows)
        slots = (row_ids % self.num_slots).view(self.batch, -1)
        self.index.update(rows.view(self.batch, -1, self.word_size), slots)

    def sparse_write(
        self, slots: Tensor, weights: Tensor, add: Tensor, erase_rows: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """new = old (1 - erase) + w add^T in place at slots [B, J]: weights [B, J], add [B, W],
        erase_rows [B, J] bool; a slot repeated in a batch row must carry the same weight and
        erase. -> (row ids [B, J], old rows, new rows [B, J, W]); an old row is the initial word
        where the slot was unwritten."""
        row_ids = slots + self._offsets
        old, new, fresh = journaled_write(self.rows, self.written, self.initial_word, row_ids, weights, add, erase_rows)
        if self.on_host:
            self._log_fresh(row_ids[fresh])
        self.index.update(new, slots)
        return row_ids, old, new

    def forget(self, mask: Tensor) -> None:
        """Batch rows where mask [B] bool is True back to the initial word everywhere."""
        super().forget(mask)
        self.index.reset(mask)

    def dense(self) -> Tensor:
        """The whole memory [B, N, W] (O(N): for tests and plots, never on the sparse path)."""
        return self.read(torch.arange(self.batch * self.num_slots, device=self.rows.device)).view(
            self.batch, self.num_slots, self.word_size
        )

    def search(self, keys: Tensor, k: int) -> Tensor:
        """The K slots most similar (cosine) to each key over all N: keys [B, R, W] -> slots [B, R, K]."""
        return self.index.search(keys.detach(), k)[1]
