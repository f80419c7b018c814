"""The sparse memories' usage: which slot was least recently used (Rae et al.'s LRU).

TimestampLRU keeps a last-access step per slot on the memory's device and finds the least
recently used slot with an argmin, with no host sync; for large N it also keeps each block's
minimum, so a step reads O(sqrt N) stamps instead of all N. It records each step's accesses on
the memory's Timeline (memory/versions.py), so a state that goes back in time finds the LRU as
it was, at a cost of O(accesses undone) at every N.
"""

import math
import weakref

import torch
from torch import Tensor

from sparsemem._malloc import huge_pages
from sparsemem.memory.versions import Timeline

STAMP = torch.int32
"""The stamps' dtype: a step count (2^31 steps)."""

BLOCKS_MIN_SLOTS = 2**12
"""From this N up the stamps are kept in blocks with each block's minimum: below it one pass over
the B x N stamps costs less than the blocks' extra ops (B = 8, 33 accesses a step, one thread:
about even at 2^12; blocks 2.5x faster at 2^14, 2.5x slower at 2^10)."""


class TimestampLRU:
    """Least recently used slot per batch row with no host sync: a last-access step per slot.

    last_access [B, N] int32 steps on the memory's device; a slot whose stamp is not after its batch
    row's last reset (reset_at [B]) counts as never accessed (0), so unwritten and untouched
    slots are the oldest, and a reset or its undo costs O(B), not O(B N). The first minimum wins,
    so ties go to the lowest slot id, as in lru_ref. Below BLOCKS_MIN_SLOTS a step's argmin reads
    all B x N stamps; from it up the stamps are split into blocks of S slots (S about sqrt(N / 16), the
    last block padded with stamps that never win) with each block's minimum kept beside them:
    the LRU is the first minimum of the first block holding the least minimum, found from N/S
    block minima and one block's S stamps, and a step refreshes only the blocks it touched. So a
    step and its undo are O(B sqrt N) per access, never O(B N), on the host and on a device
    alike. The clock is a device scalar, so a captured CUDA graph replays with the current time
    rather than the one seen at capture.
    """

    def __init__(
        self,
        batch: int,
        num_slots: int,
        device: torch.device | str,
        timeline: Timeline | None = None,
        block: int | None = None,
    ) -> None:
        if block is None and num_slots < BLOCKS_MIN_SLOTS:
            block = num_slots
        elif block is None:
            # S about sqrt(N / 16): a step reads N/S block minima and refreshes its tens of accessed
            # slots' blocks, S stamps each, so blocks smaller than sqrt N balance the two
            block = 2 ** max(0, math.floor(math.log2(num_slots / 16) / 2))
        self.block, self.blocks = block, -(-num_slots // block)
        # int32 stamps (2^31 steps): CPU reductions over int64 are several times slower
        never = torch.iinfo(STAMP).max  # the padding's stamp: after every reset, never the least
        padded = huge_pages(torch.empty(batch, self.blocks * block, dtype=STAMP, device=device)).fill_(never)
        padded[:, :num_slots] = 0
        self._blocks = padded.view(batch * self.blocks, block)  # row b * blocks + i: block i of batch row b
        self._first_block = torch.arange(batch, device=device).unsqueeze(-1) * self.blocks
        self.last_access = padded[:, :num_slots]
        self.block_min = torch.zeros(batch, self.blocks, dtype=STAMP, device=device)
        self.reset_at = torch.zeros(batch, dtype=STAMP, device=device)
        self.clock = torch.zeros((), dtype=STAMP, device=device)
        self.timeline = timeline

    def copy(self, timeline: Timeline | None) -> "TimestampLRU":
        """An LRU of its own with this one's accesses, on `timeline`."""
        batch, num_slots = self.last_access.shape
        copy = TimestampLRU(batch, num_slots, self.last_access.device, timeline, self.block)
        copy._blocks.copy_(self._blocks)
        copy.block_min.copy_(self.block_min)
        copy.reset_at.copy_(self.reset_at)
        copy.clock.copy_(self.clock)
        return copy

    def least_recent(self) -> Tensor:
        """The least recently used slot of each batch row: [B] int64."""
        if self.blocks == 1:
            return self._since_reset(self.last_access).argmin(dim=-1)
        block = self.block_min.argmin(dim=-1, keepdim=True)
        stamps = self._blocks.index_select(0, (block + self._first_block).flatten())
        return (block * self.block).flatten() + self._since_reset(stamps).argmin(dim=-1)

    def stamps(self, slots: Tensor) -> Tensor:
        """The last-access steps of slots [B, E]: [B, E], 0 where never accessed since a reset."""
        return self._since_reset(self.last_access.gather(-1, slots))

    def _since_reset(self, stamps: Tensor) -> Tensor:
        """stamps [B, M] with those not after their batch row's last reset read as 0 (never accessed)."""
        return stamps * (stamps > self.reset_at.unsqueeze(-1))  # a product: where() is 3x slower on int32

    def touch(self, slots: Tensor, accessed: Tensor) -> None:
        """One step's accesses: slots [B, E] int64 where accessed [B, E] bool (duplicates allowed)."""
        self._record_stamps(slots, 1)
        self.clock += 1
        # amax: a duplicated slot is stamped if any of its entries was accessed; 0 never lowers a stamp
        stamps = torch.where(accessed, self.clock, 0)
        self.last_access.scatter_reduce_(-1, slots, stamps, reduce="amax")
        self._refresh(slots)

    def restamp(self, slots: Tensor, stamps: Tensor, steps: int) -> None:
        """`steps` steps' accesses at once (sparsemem.ops.sam_sequence's): slots [B, E] int64 get
        stamps [B, E] (each at most the clock + steps; 0 where never accessed since a reset) and
        the clock moves on by `steps`."""
        self._record_stamps(slots, steps)
        self.clock += steps
        self.last_access.scatter_(-1, slots, stamps.to(STAMP))
        self._refresh(slots)

    def _record_stamps(self, slots: Tensor, steps: int) -> None:
        """Record on the timeline the stamps of slots [B, E] and the clock, before `steps` steps change them."""
        if self.timeline is not None:
            previous = self.last_access.gather(-1, slots)
            self.timeline.record(_StampChange(self, slots, previous, self.clock.clone(), steps))

    def _refresh(self, slots: Tensor) -> None:
        """The minima of the blocks holding slots [B, E], after their stamps changed."""
        if self.blocks == 1:
            return
        blocks = slots // self.block
        minima = self._blocks.index_select(0, (blocks + self._first_block).flatten()).amin(dim=-1)
        # a block holding a stamp from before its row's last reset holds a never-accessed slot
        self.block_min.scatter_(1, blocks, self._since_reset(minima.view_as(blocks)))

    def reset(self, mask: Tensor) -> None:
        """Batch rows where mask [B] bool is True forget their accesses: every stamp so far is at
        most the clock, so from now on each of theirs reads as never accessed. In place: a captured
        CUDA graph reads this tensor."""
        mask = mask.to(self.reset_at.device)
        if self.timeline is not None:
            self.timeline.record(_Reset(self, mask))
        self._reset(mask)

    def _reset(self, mask: Tensor) -> None:
        self.reset_at.copy_(torch.where(mask, self.clock, self.reset_at))
        self.block_min.masked_fill_(mask.unsqueeze(-1), 0)


class _StampChange:
    """A step's accesses (or `steps` steps' at once): undo puts back the stamps it replaced (a slot's
    duplicates all read the same old stamp) and the clock; redo stamps again."""

    rows = 0

    def __init__(self, lru: TimestampLRU, slots: Tensor, previous: Tensor, clock: Tensor, steps: int = 1) -> None:
        self.lru = weakref.proxy(lru)  # versions.py: no cycle
        self.slots, self.previous, self.clock, self.steps = slots, previous, clock, steps
        self.after: Tensor | None = None  # the stamps it wrote, kept by undo for redo

    def undo(self) -> None:
        self.after = self.lru.last_access.gather(-1, self.slots)
        self.lru.last_access.scatter_(-1, self.slots, self.previous)
        self.lru._refresh(self.slots)
        self.lru.clock.copy_(self.clock)

    def redo(self) -> None:
        self.lru.last_access.scatter_(-1, self.slots, self.after)
        self.lru._refresh(self.slots)
        self.lru.clock.copy_(self.clock + self.steps)


class _Reset:
    """A reset of the batch rows where mask [B] is True: undo puts back their reset steps and
    block minima (O(B N/S)), redo resets them again."""

    rows = 0

    def __init__(self, lru: TimestampLRU, mask: Tensor) -> None:
        self.lru, self.mask = weakref.proxy(lru), mask  # versions.py: no cycle
        self.reset_at, self.block_min = lru.reset_at.clone(), lru.block_min.clone()

    def undo(self) -> None:
        self.lru.reset_at.copy_(self.reset_at)
        self.lru.block_min.copy_(self.block_min)

    def redo(self) -> None:
        self.lru._reset(self.mask)


LRU = TimestampLRU


def make_lru(batch: int, num_slots: int, device: torch.device, timeline: Timeline | None = None) -> LRU:
    """The LRU of B memories of N slots on `device` (blocks from BLOCKS_MIN_SLOTS up)."""
    return TimestampLRU(batch, num_slots, device, timeline)
