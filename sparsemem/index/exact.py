"""ExactIndex: brute-force top-K over the written rows with sparsemem.ops.topk_content, on any device."""

import torch
from torch import Tensor

from sparsemem import _backends, ops
from sparsemem.index.base import Index, compaction_moves
from sparsemem.reference.dnc import safe_norm

TORCH_CHUNK_ROWS = 2**14
"""Rows per topk_content call on the torch backend, whose reference forms [B, C, W] and [B, R, C]
temporaries: 2^14 rows keep them at ~32 MiB for B = 8, W = 64 (2.2 GiB unchunked at N = 2^20)."""

JOINT_SPREAD = 256
"""Batch rows whose row counts lie at most this far apart are searched in one topk_content call over
the fullest's rows, asking for that many candidates more than K; further apart, one call per batch
row. A call costs ~30 us before any work: at B = 32 the per-row searches of SAM on the copy task
(N = 64, K = 4, whose batch rows write at different rates) took a third of a training step."""


class ExactIndex(Index):
    """Exact top-K cosine search over the written rows with sparsemem.ops.topk_content.

    Written rows are kept compact (row r of batch row b holds slot _ids[b, r]), so a fresh
    memory costs O(rows written), not O(N). New slots are appended after a batch row's last
    row and forget() fills its holes from the last rows, so forgetting the rows appended
    last restores the store, and the order of equal scores, exactly as it was.
    Rows are stored as written, in `dtype` (float64 for gradcheck-grade comparisons):
    topk_content computes the eps-cosine itself, in one pass over the rows on a fused
    backend (cpp, triton, cuda). On the torch backend, or with
    `chunk_rows` set, the rows are searched `chunk_rows` at a time and the chunks' top K merged,
    so temporary memory stays O(B R chunk_rows) for any N. Batch rows whose row counts differ
    by at most `joint_spread` are searched in one call (see JOINT_SPREAD), others one by one.

    On the device path (see Index, host and device) rows are stored by slot instead, [B, N, W]
    allocated at once with every unwritten slot holding the initial word, and each search is
    one topk_content over all N: O(N) whatever was written, but no count ever comes back to
    the host, and the work per step is fixed, so a step can be captured in a CUDA graph.
    """

    sync_free = True

    def __init__(
        self,
        batch_size: int,
        num_slots: int,
        word_size: int,
        *,
        initial: Tensor | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        chunk_rows: int | None = None,
        joint_spread: int = JOINT_SPREAD,
    ) -> None:
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype; got {dtype}")
        if chunk_rows is not None and chunk_rows < 1:
            raise ValueError(f"chunk_rows must be positive; got {chunk_rows}")
        if joint_spread < 0:
            raise ValueError(f"joint_spread must be at least 0; got {joint_spread}")
        self.device = torch.device(device)
        self.dtype = self.row_dtype = dtype
        self.chunk_rows, self.joint_spread = chunk_rows, joint_spread
        super().__init__(batch_size, num_slots, word_size, initial=initial, map_device=self.device)
        self._store = torch.empty(batch_size, 0, word_size, dtype=dtype, device=self.device)
        self._ids = torch.empty(batch_size, 0, dtype=torch.int64, device=self.device)
        self._clean = 0  # host path: rows below this position hold finite values in every batch row
        if not self.on_host:
            self._store = self._stored(self.initial).unsqueeze(1).repeat(1, num_slots, 1)

    def _stored(self, rows: Tensor) -> Tensor:
        return rows.to(device=self.device, dtype=self.dtype)

    def _update(self, batch: Tensor, slots: Tensor, words: Tensor) -> None:
        batch, slots = batch.to(self.device), slots.to(self.device)
        if not self.on_host:
            self._store[batch, slots] = words
            self._slot[batch, slots] = slots
            return
        rows = self._slot[batch, slots]
        new = rows < 0
        new_batch = batch[new]
        added = torch.bincount(new_batch, minlength=self.batch_size)
        counts = torch.tensor(self._rows, device=self.device)
        # New slots are appended after each batch row's last row, in slot order (pairs arrive sorted).
        first_new = torch.cumsum(added, 0) - added
        rank = torch.arange(new_batch.numel(), device=self.device) - first_new[new_batch]
        rows[new] = counts[new_batch] + rank
        new_counts = counts + added
        totals = new_counts.tolist()
        self._reserve(max(totals))
        top = max(totals)
        if top > self._clean:
            # Rows no batch row had reached hold what torch.empty left (maybe NaN): zeros in the batch
            # rows that do not write them now, so a search up to the fullest batch row's count reads
            # only finite rows (a preload, all counts equal, zeroes nothing).
            positions = torch.arange(self._clean, top, device=self.device)
            unwritten = positions >= new_counts.unsqueeze(-1)  # [B, top - clean]
            self._store[:, self._clean : top].masked_fill_(unwritten.unsqueeze(-1), 0)
            self._clean = top
        self._store[batch, rows] = words
        self._ids[batch, rows] = slots
        self._slot[batch, slots] = rows
        self._rows = totals

    def _forget(self, batch: Tensor, slots: Tensor) -> None:
        moved, sources, targets = compaction_moves(batch, self._slot[batch, slots], self._rows)
        self._slot[batch, slots] = -1
        self._store[moved, targets] = self._store[moved, sources]
        self._ids[moved, targets] = self._ids[moved, sources]
        self._slot[moved, self._ids[moved, targets]] = targets

    def _forget_on_device(self, batch: Tensor, slots: Tensor) -> None:
        super()._forget_on_device(batch, slots)
        self._store[batch, slots] = self._stored(self.initial)[batch]

    def _reserve(self, rows: int) -> None:
        """Room for `rows` rows per batch row. Rows past a batch row's count are never read."""
        capacity = self._store.shape[1]
        if rows <= capacity:
            return
        # On the CPU torch.empty leaves the pages untouched until rows land in them: room for all
        # N rows costs only the rows written, and a growing store (a preload) is never copied.
        # Elsewhere doubling keeps appends amortised O(1) per row; never more than N rows.
        on_cpu = self.device.type == "cpu"
        capacity = self.num_slots if on_cpu else min(self.num_slots, max(rows, 2 * capacity, 64))
        store = self._store.new_empty(self.batch_size, capacity, self.word_size)
        ids = self._ids.new_empty(self.batch_size, capacity)
        store[:, : self._store.shape[1]] = self._store
        ids[:, : self._ids.shape[1]] = self._ids
        self._store, self._ids = store, ids

    def _search(self, unit: Tensor, k: int) -> tuple[Tensor, Tensor]:
        queries = unit.to(device=self.device, dtype=self.dtype)
        if not self.on_host:  # rows are slots, the unwritten ones the initial word: search them all
            scores, slots = self._top_rows(self._store, queries, k)
            return scores * safe_norm(queries).unsqueeze(-1), slots
        low, high = min(self._rows), max(self._rows)
        if low == high:
            scores, rows = self._top_rows(self._store[:, :high], queries, k)
        elif high - low > self.joint_spread:
            # Far apart (a long stream whose batch rows fill at different rates): one search per
            # batch row over its own rows, since asking all for k + high - low candidates costs
            # O(rows (k + high - low)) and grew with every step.
            parts = [
                self._top_rows(self._store[b : b + 1, :count], queries[b : b + 1], k)
                for b, count in enumerate(self._rows)
            ]
            scores, rows = (torch.cat(part) for part in zip(*parts, strict=True))
        else:
            # Batch rows hold different row counts: one search over the fullest's, asking for as
            # many more candidates as a batch row can have rows past its count (rows that hold
            # zeros or stale words, never NaN: see _update), which are then dropped. Among equal
            # scores earlier rows come first, so the result is each batch row's own top K.
            scores, rows = self._top_rows(self._store[:, :high], queries, min(k + high - low, high))
            past = rows >= torch.tensor(self._rows, device=self.device).view(-1, 1, 1)
            scores = scores.masked_fill(past, float("-inf"))
            scores, order = scores.sort(dim=-1, descending=True, stable=True)
            rows = rows.masked_fill(past, -1).gather(-1, order)
            if rows.shape[-1] < k:
                pad = (*rows.shape[:-1], k - rows.shape[-1])
                scores = torch.cat([scores, scores.new_full(pad, float("-inf"))], -1)
                rows = torch.cat([rows, rows.new_full(pad, -1)], -1)
            scores, rows = scores[..., :k], rows[..., :k]
        # topk_content scores D(q', M_i) for the unit query q' = q / ||q||_eps, and
        # D(q, M_i) = D(q', M_i) ||q'||_eps: the same ranking, rescaled to the contract's score.
        scores = scores * safe_norm(queries).unsqueeze(-1)
        if not max(self._rows):
            return scores, rows
        ids = self._ids.gather(1, rows.clamp(min=0).flatten(1)).view_as(rows)
        return scores, ids.masked_fill(rows < 0, -1)

    def _top_rows(self, store: Tensor, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Top-K rows of store [B', C, W] for queries [B', R, W]: (scores, rows) [B', R, K], padded with
        -inf and -1 past C rows. Equal scores keep the earlier row first (fused backends) across chunks."""
        count = store.shape[1]
        chunk = self.chunk_rows or (max(count, 1) if self._fused() else TORCH_CHUNK_ROWS)
        if k <= count <= chunk:  # one call finds all K (every search of the device path): no padding or merge
            with torch.no_grad():
                return ops.topk_content(store, queries, k)
        parts = []
        with torch.no_grad():
            for start in range(0, count, chunk):
                part = store[:, start : start + chunk]
                scores, rows = ops.topk_content(part, queries, min(k, part.shape[1]))
                parts.append((scores, rows + start))
        pad = queries.new_full((*queries.shape[:2], k), float("-inf"))
        scores = torch.cat([*(scores for scores, _ in parts), pad], -1)
        rows = torch.cat([*(rows for _, rows in parts), torch.full_like(pad, -1, dtype=torch.int64)], -1)
        if len(parts) > 1:  # a stable sort keeps earlier chunks, so earlier rows, first among equals
            scores, order = scores.sort(dim=-1, descending=True, stable=True)
            rows = rows.gather(-1, order)
        return scores[..., :k], rows[..., :k]

    def _fused(self) -> bool:
        """Whether topk_content runs a fused kernel here (no [B, R, C] score tensor, so no chunking)."""
        return _backends.backend_for("topk_content", self.device) != "torch"

    def rebuild(self) -> None:
        """Nothing to rebuild: rows are overwritten in place, so there are no tombstones."""

    def _reset_on_device(self, mask: Tensor) -> None:
        super()._reset_on_device(mask)
        # in place, no [B, N, W] temporary: zero the reset batch rows, then add their initial word
        rows = mask.view(-1, 1, 1)
        self._store.masked_fill_(rows, 0).add_(self._stored(self.initial).unsqueeze(1) * rows)

    def _reset_row(self, b: int) -> None:
        self._slot[b, self._ids[b, : self._rows[b]]] = -1

    def _bytes(self) -> int:
        # On the CPU only the pages of stored rows are resident (see _reserve); elsewhere all capacity is.
        rows = self.batch_size * (max(self._rows) if self.device.type == "cpu" else self._store.shape[1])
        return rows * (self.word_size * self._store.element_size() + self._ids.element_size())
