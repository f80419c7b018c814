"""The sparse memories' usage: which slot was least recently used (Rae et al.'s LRU).

HostLRU on the host (last-access stamps and a heap, O(log E) per access), TimestampLRU on a
device (a last-access stamp per slot and an argmin, no host sync); make_lru picks by device
and, on the host, by N (the argmin is cheaper than the heap's Python work for small N).
Both record each step's accesses on the memory's Timeline (memory/versions.py), so a state
that goes back in time finds the LRU as it was.
"""

import heapq

import torch
from torch import Tensor

from sparsemem import _checks
from sparsemem.memory.versions import Timeline


class HostLRU:
    """Least recently used slot per batch row on the host, O(log E) per access, and undoable.

    A slot's last access is a step stamp (a dict of the touched slots) and a heap of (stamp, slot)
    finds the oldest, stale entries dropped when they reach the top; never-touched slots are all
    older than any touched one and come out lowest first: from a cursor below which every slot
    was touched, and a heap of the slots an undo made untouched again. Ties (slots accessed in
    the same step) go to the lowest slot id, as in lru_ref. So nothing is O(N), and a step's
    accesses are undone in O(accesses) (memory/versions.py). Every call reads its tensors on
    the host, which on a GPU would be a sync: the device's LRU is TimestampLRU.
    """

    def __init__(self, batch: int, num_slots: int, timeline: Timeline | None = None) -> None:
        self.num_slots = num_slots
        self.timeline = timeline
        self.rows = [_LRURow() for _ in range(batch)]
        self.clock = 0

    def copy(self, timeline: Timeline | None) -> "HostLRU":
        """An LRU of its own with this one's accesses (O(slots touched)), on `timeline`."""
        copy = HostLRU(len(self.rows), self.num_slots, timeline)
        copy.rows = [row.copy() for row in self.rows]
        copy.clock = self.clock
        return copy

    def least_recent(self) -> Tensor:
        """The least recently used slot of each batch row: [B] int64."""
        return torch.tensor([row.least_recent(self.num_slots) for row in self.rows], dtype=torch.int64)

    def touch(self, slots: Tensor, accessed: Tensor) -> None:
        """One step's accesses: slots [B, E] int64 where accessed [B, E] bool (duplicates allowed)."""
        self.clock += 1
        previous = []
        for row, ids, mask in zip(self.rows, slots.tolist(), accessed.tolist(), strict=True):
            touched = {s for s, a in zip(ids, mask, strict=True) if a}
            previous.append(row.stamp_all(touched, self.clock))
        if self.timeline is not None:
            self.timeline.record(_Touch(self, previous, self.clock))

    def reset(self, mask: Tensor) -> None:
        """Batch rows where mask [B] bool is True forget their accesses."""
        forgotten = {b: self.rows[b] for b in mask.nonzero().flatten().tolist()}
        for b in forgotten:
            self.rows[b] = _LRURow()
        if self.timeline is not None:
            self.timeline.record(_Swap(self, forgotten))


class _LRURow:
    __slots__ = ("cursor", "heap", "released", "stamps")

    def __init__(self) -> None:
        self.stamps: dict[int, int] = {}
        self.heap: list[tuple[int, int]] = []
        self.released: list[int] = []
        self.cursor = 0

    def copy(self) -> "_LRURow":
        copy = _LRURow()
        copy.stamps, copy.heap, copy.released, copy.cursor = (
            dict(self.stamps),
            list(self.heap),
            list(self.released),
            self.cursor,
        )
        return copy

    def least_recent(self, num_slots: int) -> int:
        stamps, released = self.stamps, self.released
        while self.cursor < num_slots and self.cursor in stamps:
            self.cursor += 1
        while released and released[0] in stamps:
            heapq.heappop(released)
        if released:
            return released[0]
        if self.cursor < num_slots:
            return self.cursor
        heap = self.heap
        while stamps.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)
        return heap[0][1]

    def stamp_all(self, slots: set[int], clock: int) -> dict[int, int | None]:
        """Stamp slots with clock -> their previous stamps (None: never touched)."""
        previous = {slot: self.stamps.get(slot) for slot in slots}
        for slot in slots:
            self.stamps[slot] = clock
            heapq.heappush(self.heap, (clock, slot))
        if len(self.heap) > 2 * len(self.stamps) + 64:  # stale entries: rebuild from the stamps
            self.heap = [(stamp, slot) for slot, stamp in self.stamps.items()]
            heapq.heapify(self.heap)
        return previous

    def restore(self, previous: dict[int, int | None]) -> None:
        for slot, stamp in previous.items():
            if stamp is None:
                del self.stamps[slot]
                if slot < self.cursor:
                    heapq.heappush(self.released, slot)
            else:
                self.stamps[slot] = stamp
                heapq.heappush(self.heap, (stamp, slot))


class _Touch:
    """A step's accesses: undo restores the stamps they replaced, redo stamps again."""

    rows = 0  # stamps, not memory rows

    def __init__(self, lru: HostLRU, previous: list[dict[int, int | None]], clock: int) -> None:
        self.lru, self.previous, self.clock = lru, previous, clock

    def undo(self) -> None:
        for row, previous in zip(self.lru.rows, self.previous, strict=True):
            row.restore(previous)
        self.lru.clock = self.clock - 1

    def redo(self) -> None:
        for row, previous in zip(self.lru.rows, self.previous, strict=True):
            row.stamp_all(set(previous), self.clock)
        self.lru.clock = self.clock


class _Swap:
    """A reset: the forgotten rows' structures are kept whole, so undo swaps them back in O(1)."""

    rows = 0

    def __init__(self, lru: HostLRU, forgotten: dict[int, _LRURow]) -> None:
        self.lru, self.kept = lru, forgotten

    def undo(self) -> None:
        self._swap()

    def redo(self) -> None:
        self._swap()

    def _swap(self) -> None:
        for b, row in self.kept.items():
            self.lru.rows[b], self.kept[b] = row, self.lru.rows[b]


class TimestampLRU:
    """Least recently used slot per batch row with no host sync: a last-access step per slot and an argmin.

    last_access [B, N] int64 on the memory's device (0: never accessed, so unwritten and
    untouched slots are the oldest); argmin returns the first minimum, so ties go to the
    lowest slot id, as in lru_ref and HostLRU. O(N) per step, but one pass on the device
    instead of a round trip to the host. The clock is a device scalar, so a captured CUDA
    graph replays with the current time rather than the one seen at capture.
    """

    def __init__(
        self, batch: int, num_slots: int, device: torch.device | str, timeline: Timeline | None = None
    ) -> None:
        self.last_access = torch.zeros(batch, num_slots, dtype=torch.int64, device=device)
        self.clock = torch.zeros((), dtype=torch.int64, device=device)
        self.timeline = timeline

    def copy(self, timeline: Timeline | None) -> "TimestampLRU":
        """An LRU of its own with this one's accesses, on `timeline`."""
        copy = TimestampLRU(*self.last_access.shape, self.last_access.device, timeline)
        copy.last_access.copy_(self.last_access)
        copy.clock.copy_(self.clock)
        return copy

    def least_recent(self) -> Tensor:
        """The least recently used slot of each batch row: [B] int64."""
        return self.last_access.argmin(dim=-1)

    def touch(self, slots: Tensor, accessed: Tensor) -> None:
        """One step's accesses: slots [B, E] int64 where accessed [B, E] bool (duplicates allowed)."""
        if self.timeline is not None:
            self.timeline.record(_StampChange(self, slots, self.last_access.gather(-1, slots), self.clock.clone()))
        self.clock += 1
        self._stamp(slots, accessed)

    def _stamp(self, slots: Tensor, accessed: Tensor) -> None:
        # amax: a duplicated slot is stamped if any of its entries was accessed; 0 never lowers a stamp
        stamps = torch.where(accessed, self.clock, 0)
        self.last_access.scatter_reduce_(-1, slots, stamps, reduce="amax")

    def reset(self, mask: Tensor) -> None:
        """Batch rows where mask [B] bool is True forget their accesses."""
        if self.timeline is not None:
            self.timeline.record(_StampRows(self, mask, self.last_access.clone()))
        self.last_access.masked_fill_(mask.unsqueeze(-1), 0)


class _StampChange:
    """A device step's accesses: undo puts back the stamps it replaced (a slot's duplicates all
    read the same old stamp) and the clock; redo stamps again."""

    rows = 0

    def __init__(self, lru: TimestampLRU, slots: Tensor, previous: Tensor, clock: Tensor) -> None:
        self.lru, self.slots, self.previous, self.clock = lru, slots, previous, clock
        self.after: Tensor | None = None  # the stamps it wrote, kept by undo for redo

    def undo(self) -> None:
        self.after = self.lru.last_access.gather(-1, self.slots)
        self.lru.last_access.scatter_(-1, self.slots, self.previous)
        self.lru.clock.copy_(self.clock)

    def redo(self) -> None:
        self.lru.last_access.scatter_(-1, self.slots, self.after)
        self.lru.clock.copy_(self.clock + 1)


class _StampRows:
    """A device reset: undo puts back the reset batch rows' stamps (kept whole, O(B N) like the
    argmin of every step: selecting the reset rows would wait for the device)."""

    rows = 0

    def __init__(self, lru: TimestampLRU, mask: Tensor, previous: Tensor) -> None:
        self.lru, self.mask, self.previous = lru, mask, previous

    def undo(self) -> None:
        self.lru.last_access.copy_(torch.where(self.mask.unsqueeze(-1), self.previous, self.lru.last_access))

    def redo(self) -> None:
        self.lru.last_access.masked_fill_(self.mask.unsqueeze(-1), 0)


LRU = HostLRU | TimestampLRU


HOST_LRU_MIN_SLOTS = 2**15
"""From this N up the CPU uses HostLRU; below it TimestampLRU's O(B N) argmin (tens of us at
N = 2^14, B = 8) is cheaper than HostLRU's Python work per accessed slot (several hundred us a step)."""


def make_lru(batch: int, num_slots: int, device: torch.device, timeline: Timeline | None = None) -> LRU:
    """TimestampLRU on a device (no host sync) and for N < HOST_LRU_MIN_SLOTS on the CPU; HostLRU
    (O(log E) per access, nothing O(N)) for larger N on the CPU. Both give the same slots."""
    if _checks.on_host(device) and num_slots >= HOST_LRU_MIN_SLOTS:
        return HostLRU(batch, num_slots, timeline)
    return TimestampLRU(batch, num_slots, device, timeline)
