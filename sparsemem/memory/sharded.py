"""SAM and SDNC with their N slots split across the ranks of a process group (shard_group=...).

Each rank holds its N_r slots (memory/shard.py: contiguous ranges, in rank order) in a RowStore
of its own, with that shard's index (exact or approximate) and LRU, and runs the unsharded step
(SAMMemory.step, SDNCMemory.step, unchanged) on these views of them:
  ShardStore.search(keys, K)   every rank's top K over its shard (scores, global slot ids) is
                               all_gathered and the global top K merged: a stable sort, so among
                               equal scores the lower rank, hence the lower slot, comes first, as
                               in the unsharded model.
  ShardedRows.gather(slots)    each rank reads the slots it owns (zeros for the others'); combine()
                               sums them over the ranks. Their gradient goes back to the owner's
                               journal only.
  ShardedRows.write(...)       each rank writes the slots it owns; the other entries go to its
                               store's spare row, as a padded batch row's do. The weights and add
                               vector are replicate()d: their gradient is summed over the ranks.
  ShardLRU.least_recent()      every rank's least recently used slot and its last-access stamp are
                               all_gathered, the oldest wins (the lower slot among equals): the LRU is
                               global. touch() stamps the slots a rank owns; every clock steps alike.
Replicated on every rank: the controller, interface, read and write weights, and SDNC's link rows
(K_L per touched slot: each rank makes the same update from the same merged weights). A rank sends
O(B R K W) per step (the read rows' all_reduce) and O(B R K) more (candidates, LRU offers), never
O(N); the benchmark counts it (bench/bench_sharded.py).

States stay values across shards: each rank's store and LRU record on its own Timeline, the ranks
step together, so a version is the same step count on every rank; going back to a state undoes
each rank's own rows, and clone() copies each rank's shard.
"""

from dataclasses import replace

import torch
from torch import Tensor

from sparsemem.memory.journal import JournaledMemory
from sparsemem.memory.lru import LRU, make_lru
from sparsemem.memory.row_store import RowStore
from sparsemem.memory.sam import SAMMemory, SAMState
from sparsemem.memory.sdnc import SDNCMemory, SDNCState
from sparsemem.memory.shard import DEFAULT_TIMEOUT, ShardGroup, combine, replicate
from sparsemem.memory.versions import Timeline


class ShardStore:
    """What the step asks of `state.memory.store`, over all N slots: sizes, the timeline, search,
    copy. `local` is this rank's RowStore of N_r slots (local slot s is global slot start + s)."""

    def __init__(self, local: RowStore, shard: ShardGroup) -> None:
        self.local, self.shard = local, shard

    @property
    def batch(self) -> int:
        return self.local.batch

    @property
    def num_slots(self) -> int:
        return self.shard.num_slots

    @property
    def word_size(self) -> int:
        return self.local.word_size

    @property
    def timeline(self) -> Timeline | None:
        return self.local.timeline

    @timeline.setter
    def timeline(self, timeline: Timeline | None) -> None:
        self.local.timeline = timeline

    def copy(self, timeline: Timeline) -> "ShardStore":
        """This rank's shard copied onto `timeline` (every rank copies its own)."""
        return ShardStore(self.local.copy(timeline), self.shard)

    def search(self, keys: Tensor, k: int) -> Tensor:
        """The K slots most similar to each key over all N: keys [B, R, W] -> global slots [B, R, K]."""
        shard, local_k = self.shard, min(k, self.local.num_slots)
        scores, ids = self.local.index.search(keys.detach(), local_k)
        ids = torch.where(ids >= 0, ids + shard.start, -1)
        if local_k < k:  # a shard smaller than K offers all it has; the others fill the rest
            pad = (*ids.shape[:-1], k - local_k)
            scores = torch.cat([scores, scores.new_full(pad, float("-inf"))], -1)
            ids = torch.cat([ids, ids.new_full(pad, -1)], -1)
        batch, heads = keys.shape[:2]
        # [P, B, R, K] -> [B, R, P K] in rank order; the stable sort keeps lower ranks first among equals
        scores = shard.gather(scores).permute(1, 2, 0, 3).reshape(batch, heads, -1)
        ids = shard.gather(ids).permute(1, 2, 0, 3).reshape(batch, heads, -1)
        order = scores.sort(dim=-1, descending=True, stable=True).indices[..., :k]
        return ids.gather(-1, order).to(keys.device)

    def dense(self) -> Tensor:
        """The whole memory [B, N, W], every rank's shard (O(N): for tests and plots)."""
        shard, rows = self.shard, self.local.dense()
        padded = rows.new_zeros(rows.shape[0], shard.largest, rows.shape[2])
        padded[:, : rows.shape[1]] = rows
        parts = shard.gather(padded)
        sizes = [stop - start for start, stop in zip(shard.starts[:-1], shard.starts[1:], strict=True)]
        return torch.cat([part[:, :size] for part, size in zip(parts, sizes, strict=True)], dim=1)


class ShardedRows:
    """A state's view of the sharded rows (what JournaledMemory is to one store): gathers and
    writes by global slot, over this rank's JournaledMemory `local` of its shard."""

    def __init__(self, local: JournaledMemory, store: ShardStore) -> None:
        self.local, self.store = local, store

    @property
    def shard(self) -> ShardGroup:
        return self.store.shard

    def advance(self) -> "ShardedRows":
        return ShardedRows(self.local.advance(), self.store)

    def detached(self) -> "ShardedRows":
        return ShardedRows(self.local.detached(), self.store)

    def reset(self, mask: Tensor) -> None:
        self.local.reset(mask)

    def gather(self, slots: Tensor) -> Tensor:
        """slots [B, Q] (global) -> rows [B, Q, W], the same on every rank."""
        owned, local = self.shard.local(slots)
        rows = self.local.gather(local)
        return combine(self.shard, torch.where(owned.unsqueeze(-1), rows, 0))

    def write(
        self,
        slots: Tensor,
        weights: Tensor,
        add: Tensor,
        erase_rows: Tensor,
        first: Tensor,
        active: Tensor | None = None,
    ) -> None:
        """JournaledMemory.write by global slots [B, J]: each rank writes the ones it owns."""
        owned, local = self.shard.local(slots)
        entries = owned if active is None else owned & active.unsqueeze(-1)
        weights, add = replicate(self.shard, weights), replicate(self.shard, add)
        self.local.write(local, weights, add, erase_rows, first, entries)


class ShardLRU:
    """The least recently used slot over all ranks; `local` is this rank's LRU of its N_r slots."""

    def __init__(self, local: LRU, shard: ShardGroup) -> None:
        self.local, self.shard = local, shard

    def copy(self, timeline: Timeline | None) -> "ShardLRU":
        return ShardLRU(self.local.copy(timeline), self.shard)

    def least_recent(self) -> Tensor:
        """[B] int64 global slots: the oldest last access over every rank's offer, the lower slot among equals."""
        shard, slots = self.shard, self.local.least_recent()
        stamps = self.local.stamps(slots.unsqueeze(-1)).squeeze(-1).to(slots.dtype)
        offers = shard.gather(torch.stack([stamps, slots + shard.start]))  # [P, 2, B]
        oldest = (offers[:, 0] * shard.num_slots + offers[:, 1]).argmin(0)  # stamp first, then slot
        return offers[:, 1].gather(0, oldest.unsqueeze(0)).squeeze(0)

    def touch(self, slots: Tensor, accessed: Tensor) -> None:
        owned, local = self.shard.local(slots)
        self.local.touch(local, accessed & owned)

    def reset(self, mask: Tensor) -> None:
        self.local.reset(mask)


class ShardedSAMState(SAMState):
    """SAMState over sharded rows (memory: ShardedRows, usage: ShardLRU)."""

    def clone(self) -> "ShardedSAMState":
        state = super().clone()  # its memory: a JournaledMemory over the ShardStore's copy
        return replace(state, memory=ShardedRows(JournaledMemory(state.memory.store.local), state.memory.store))


class ShardedSDNCState(ShardedSAMState, SDNCState):
    """SDNCState over sharded rows; the link rows are replicated on every rank."""


class ShardedSAMMemory(SAMMemory):
    """SAMMemory whose N slots are split across the ranks of `shard_group` (a torch.distributed
    ProcessGroup); every rank of the group calls it with the same inputs. timeout: seconds each
    collective waits for the other ranks."""

    state_type = ShardedSAMState

    def __init__(
        self,
        num_slots: int,
        word_size: int,
        num_reads: int,
        k: int = 8,
        index: str = "exact",
        *,
        shard_group: object,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        super().__init__(num_slots, word_size, num_reads, k, index)
        self.shard = ShardGroup(shard_group, num_slots, timeout)

    def init_state(
        self,
        batch: int,
        memory: Tensor | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> ShardedSAMState:
        """SAMMemory.init_state on this rank's shard: memory [B, N, W] or [N, W] is the whole
        memory (the same on every rank), of which each rank keeps its slots."""
        shard = self.shard
        initial_rows = self.initial_memory(batch, memory, device, dtype)
        sizes = {"B": batch, "N": self.num_slots, "W": self.word_size, "R": self.num_reads, "K": self.k}
        sizes["K_L"] = getattr(self, "link_k", 0)
        sizes["preloaded"] = int(initial_rows is not None)
        shard.check_same("call init_state", sizes)
        if initial_rows is not None:  # its gradient, from each rank's slots, is summed over the ranks
            initial_rows = replicate(shard, initial_rows)[:, shard.start : shard.stop]
        store = self.row_store(batch, shard.local_slots, initial_rows, device, dtype)
        memory = ShardedRows(JournaledMemory(store, initial_rows), ShardStore(store, shard))
        usage = ShardLRU(make_lru(batch, shard.local_slots, store.initial_word.device, store.timeline), shard)
        return self.start_state(store, memory, usage)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, P={self.shard.size}, slots {self.shard.start}..{self.shard.stop - 1} here"


class ShardedSDNCMemory(SDNCMemory, ShardedSAMMemory):
    """SDNCMemory whose N slots are split across the ranks of `shard_group` (see ShardedSAMMemory)."""

    state_type = ShardedSDNCState

    def __init__(
        self,
        num_slots: int,
        word_size: int,
        num_reads: int,
        k: int = 8,
        index: str = "exact",
        link_k: int = 8,
        *,
        shard_group: object,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        # ShardedSAMMemory's (then SAMMemory's) __init__; SDNCMemory's adds only link_k
        ShardedSAMMemory.__init__(
            self, num_slots, word_size, num_reads, k, index, shard_group=shard_group, timeout=timeout
        )
        if not isinstance(link_k, int) or not 1 <= link_k <= num_slots:
            raise ValueError(f"link_k must be in [1, N={num_slots}]; got link_k={link_k}")
        self.link_k = link_k

    def init_state(
        self,
        batch: int,
        memory: Tensor | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> ShardedSDNCState:
        # SDNCMemory.init_state around ShardedSAMMemory.init_state (the next in the MRO)
        return ShardedSDNCState(**vars(super().init_state(batch, memory, device, dtype)))
