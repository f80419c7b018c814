"""WriteBuffer: the exact buffer in front of an approximate index (DESIGN.md, "The index").

Written rows wait here, searched by brute force, until the index merges them in one batch:
inserting rows one step at a time would cost far more than the exact scan of a bounded
buffer. An index keeps its own policy for when to merge; the buffer keeps the rows.
"""

import torch
from torch import Tensor

from sparsemem.index.base import compaction_moves


class WriteBuffer:
    """Up to `capacity` unit rows per batch row, with their slots, searched exactly.

    A buffered slot's code in the index's slot map is -2 - its position (<= -2), so a slot
    written again while buffered changes its row in place. held[b] (on the host) and counts
    [B] (on the buffer's device) are the rows batch row b holds, in positions 0 .. held[b] - 1.
    """

    def __init__(
        self, slot_map: Tensor, capacity: int, word_size: int, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        batch_size = slot_map.shape[0]
        self.slot_map = slot_map
        self.capacity = capacity
        self.rows = torch.zeros(batch_size, capacity, word_size, dtype=dtype, device=device)
        self.slots = torch.full((batch_size, capacity), -1, dtype=torch.int64, device=device)
        self.held = [0] * batch_size
        self.counts = torch.zeros(batch_size, dtype=torch.int64, device=device)

    def overwrite(self, batch: Tensor, codes: Tensor, unit: Tensor) -> None:
        """New rows unit [M, W] for buffered slots, given by (batch [M], their slot-map codes [M])."""
        self.rows[batch, -2 - codes] = unit

    def put(self, batch: Tensor, positions: Tensor, slots: Tensor, unit: Tensor) -> None:
        """Rows unit [M, W] of slots [M] at (batch [M], positions [M]); then grow() counts them."""
        self.rows[batch, positions] = unit
        self.slots[batch, positions] = slots
        self.slot_map[batch, slots] = -2 - positions

    def remove(self, batch: Tensor, codes: Tensor) -> None:
        """Drop the rows of distinct buffered slots, given by (batch [M], their slot-map codes [M]): a
        batch row's last held rows fill the holes, their codes follow (the dropped slots' are the index's)."""
        if not batch.numel():
            return
        moved, sources, targets = compaction_moves(batch, -2 - codes, self.held)
        self.rows[moved, targets] = self.rows[moved, sources]
        self.slots[moved, targets] = self.slots[moved, sources]
        self.slot_map[moved, self.slots[moved, targets]] = -2 - targets
        removed = torch.bincount(batch, minlength=len(self.held))
        self.held = [held - count for held, count in zip(self.held, removed.tolist(), strict=True)]
        self.counts -= removed.to(self.counts.device)

    def grow(self, added: list[int]) -> None:
        """Count added[b] more rows held by batch row b (after put())."""
        self.held = [held + count for held, count in zip(self.held, added, strict=True)]
        self.counts += torch.tensor(added, device=self.counts.device)

    def row(self, b: int) -> tuple[Tensor, Tensor]:
        """Batch row b's held (rows [held, W], slots [held]), as views of the buffer."""
        return self.rows[b, : self.held[b]], self.slots[b, : self.held[b]]

    def held_rows(self) -> tuple[Tensor, Tensor, Tensor]:
        """Every held row: (batch [M], slots [M], rows [M, W]), sorted by batch row, then position."""
        held = torch.arange(self.capacity, device=self.counts.device) < self.counts.unsqueeze(1)
        return held.nonzero()[:, 0], self.slots[held], self.rows[held]

    def clear(self, b: int | None = None) -> None:
        """Batch row b (every batch row when None) holds no rows (its slot codes are the index's to reset)."""
        if b is None:
            self.held = [0] * len(self.held)
            self.counts.zero_()
        else:
            self.held[b] = 0
            self.counts[b] = 0

    def search(self, unit: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Top-K over the held rows for unit queries [B, R, W]: (scores, slots) [B, R, K],
        padded with -inf and -1 where a batch row holds fewer than K rows."""
        batch_size, heads = unit.shape[:2]
        scores = unit.new_full((batch_size, heads, k), float("-inf"))
        ids = torch.full((batch_size, heads, k), -1, dtype=torch.int64, device=self.slots.device)
        filled = max(self.held)
        if filled == 0:
            return scores, ids
        all_scores = torch.bmm(unit, self.rows[:, :filled].transpose(1, 2))
        empty = torch.arange(filled, device=self.counts.device) >= self.counts.unsqueeze(1)
        all_scores = all_scores.masked_fill(empty.unsqueeze(1), float("-inf"))
        top_scores, rows = all_scores.topk(min(k, filled), dim=-1)
        top_ids = self.slots[:, :filled].gather(1, rows.flatten(1)).view_as(rows)
        top_ids = top_ids.masked_fill(top_scores == float("-inf"), -1)
        scores[..., : rows.shape[-1]], ids[..., : rows.shape[-1]] = top_scores, top_ids
        return scores, ids

    def total(self) -> int:
        """Rows held over all batch rows."""
        return sum(self.held)

    def bytes(self) -> int:
        return self.rows.numel() * self.rows.element_size() + self.slots.numel() * self.slots.element_size()
