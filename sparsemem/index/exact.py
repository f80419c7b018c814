"""ExactIndex: brute-force top-K over the written rows, with torch, on any device."""

import torch
from torch import Tensor

from sparsemem.index.base import Index


class ExactIndex(Index):
    """Exact top-K cosine search with torch matmul + topk, chunked over the written rows.

    Written rows are kept compact (row r of batch row b holds slot _ids[b, r]), so a fresh
    memory costs O(rows written), not O(N). Each chunk of `chunk_rows` rows is scored and
    cut to its top K before the next, so temporary memory is O(B R chunk_rows) for any N.
    Rows are stored as x / ||x||_eps in `dtype` (float64 for gradcheck-grade comparisons).
    """

    def __init__(
        self,
        batch_size: int,
        num_slots: int,
        word_size: int,
        *,
        initial: Tensor | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        chunk_rows: int = 2**16,
    ) -> None:
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype; got {dtype}")
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be positive; got {chunk_rows}")
        self.device = torch.device(device)
        self.dtype = self.row_dtype = dtype
        self.chunk_rows = chunk_rows
        super().__init__(batch_size, num_slots, word_size, initial=initial, map_device=self.device)
        self._store = torch.empty(batch_size, 0, word_size, dtype=dtype, device=self.device)
        self._ids = torch.empty(batch_size, 0, dtype=torch.int64, device=self.device)

    def _update(self, batch: Tensor, slots: Tensor, unit: Tensor) -> None:
        batch, slots = batch.to(self.device), slots.to(self.device)
        unit = unit.to(device=self.device, dtype=self.dtype)
        rows = self._slot[batch, slots]
        new = rows < 0
        new_batch = batch[new]
        added = torch.bincount(new_batch, minlength=self.batch_size)
        counts = torch.tensor(self._rows, device=self.device)
        # New slots are appended after each batch row's last row, in slot order (pairs arrive sorted).
        first_new = torch.cumsum(added, 0) - added
        rank = torch.arange(new_batch.numel(), device=self.device) - first_new[new_batch]
        rows[new] = counts[new_batch] + rank
        totals = (counts + added).tolist()
        self._reserve(max(totals))
        self._store[batch, rows] = unit
        self._ids[batch, rows] = slots
        self._slot[batch, slots] = rows
        self._rows = totals

    def _reserve(self, rows: int) -> None:
        capacity = self._store.shape[1]
        if rows <= capacity:
            return
        # Doubling keeps appends amortised O(1) per row; never more than N rows.
        capacity = min(self.num_slots, max(rows, 2 * capacity, 64))
        store = self._store.new_empty(self.batch_size, capacity, self.word_size)
        ids = self._ids.new_full((self.batch_size, capacity), -1)
        store[:, : self._store.shape[1]] = self._store
        ids[:, : self._ids.shape[1]] = self._ids
        self._store, self._ids = store, ids

    def _search(self, unit: Tensor, k: int) -> tuple[Tensor, Tensor]:
        unit = unit.to(device=self.device, dtype=self.dtype)
        heads = unit.shape[1]
        best_scores = unit.new_full((self.batch_size, heads, k), float("-inf"))
        best_rows = torch.full((self.batch_size, heads, k), -1, dtype=torch.int64, device=self.device)
        counts = torch.tensor(self._rows, device=self.device)
        full = min(self._rows)
        for start in range(0, max(self._rows), self.chunk_rows):
            chunk = self._store[:, start : start + self.chunk_rows]
            # [B, C, W] @ [B, W, R]: the long side as the GEMM's M is ~2x faster than [B, R, W] @ [B, W, C].
            scores = torch.bmm(chunk, unit.transpose(1, 2)).transpose(1, 2)
            if start + chunk.shape[1] > full:  # some batch row has fewer rows than this chunk holds
                rows = torch.arange(start, start + chunk.shape[1], device=self.device)
                scores = scores.masked_fill((rows >= counts.unsqueeze(1)).unsqueeze(1), float("-inf"))
            top_scores, top = scores.topk(min(k, chunk.shape[1]), dim=-1)
            merged, order = torch.cat([best_scores, top_scores], -1).topk(k, dim=-1)
            best_rows = torch.cat([best_rows, top + start], -1).gather(-1, order)
            best_scores = merged
        if not max(self._rows):
            return best_scores, best_rows
        valid = best_scores > float("-inf")
        ids = self._ids.gather(1, best_rows.clamp(min=0).flatten(1)).view_as(best_rows)
        return best_scores, ids.masked_fill(~valid, -1)

    def rebuild(self) -> None:
        """Nothing to rebuild: rows are overwritten in place, so there are no tombstones."""

    def _reset_row(self, b: int) -> None:
        written = self._ids[b, : self._rows[b]]
        self._slot[b, written] = -1
        self._ids[b, : self._rows[b]] = -1

    def _bytes(self) -> int:
        return self._store.numel() * self._store.element_size() + self._ids.numel() * self._ids.element_size()
