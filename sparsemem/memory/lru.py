"""The sparse memories' usage: which slot was least recently used (Rae et al.'s LRU).

ListLRU on the host (an access-ordered list, O(1) per access), TimestampLRU on a device (a
last-access step per slot and an argmin, no host sync); make_lru picks by device.
"""

from collections import OrderedDict

import torch
from torch import Tensor

from sparsemem import _checks


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
