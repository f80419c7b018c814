"""The index interface: nearest-neighbour search over B lazy memories of N slots of W dims.

Lazy memory (DESIGN.md): a freshly reset memory is N copies of one initial word.
Only written rows are given to an index (`update`); every slot never written
since the last `reset` holds the shared initial word. The index owns that rule,
so the memory module never materialises the unwritten slots: `search` scores
the initial word once per query and, where it reaches the top K, returns
concrete unwritten slot ids (the lowest ones), so the K candidates are exactly
those of a top-K over the full memory of N slots. `unwritten(count)` gives
the same ids to the memory module, e.g. to pick a least recently used slot
(any unwritten slot is least recently used).
"""

import abc
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from sparsemem import _checks
from sparsemem._checks import Shapes, check_finite, check_indices, check_range
from sparsemem._profiling import region
from sparsemem.reference.dnc import safe_norm

UPDATE_CHUNK = 2**16
"""Rows normalised and stored per step of a large update (bounds its temporary memory)."""

DENSE_VALUES = 2**20
"""Up to this many stored values (B N W) a sync_free index takes the device path on the CPU too:
one fused search over all N slots costs less than the host path's per-step bookkeeping (counts,
compaction, the unwritten slots' merge). SAM on train's copy task (B = 32, N = 64, W = 16): about
1.25x the training throughput; a SAM step fwd+bwd, B = 8, W = 64, R = 4, K = 8, T = 16: even or
faster up to N = 2^12 (2^21 values), slower from 2^14 (2^23) up."""


@dataclass
class IndexStats:
    """What an index holds and what it has cost so far (summed over the B batch rows)."""

    rows: int
    """Slots holding written content (the rest hold the initial word)."""
    buffered: int
    """Of those, rows waiting in the exact buffer for a merge into the approximate index."""
    tombstones: int
    """Stale entries of overwritten rows still inside the approximate index (filtered at search)."""
    merges: int
    merge_seconds: float
    """Time spent merging the exact buffer into the approximate index (incremental inserts)."""
    rebuilds: int
    build_seconds: float
    """Time spent building an approximate index from scratch (first build, retraining, tombstone purges)."""
    bytes: int
    """Memory held by the index: stored vectors, graph or lists, id maps, buffer."""


class Index(abc.ABC):
    """Top-K cosine search over the slots of B independent memories (one per batch row).

    Contract, for every implementation:
    - `update(rows [B, J, W], ids [B, J])` sets the content of slots `ids` to `rows`
      (an id written before is replaced; a repeated id within one call keeps its last row).
      The next `search` sees it; no stale content of an overwritten slot is ever returned.
    - `update_entries(batch [M], slots [M], rows [M, W])`: update() for M entries of any
      batch rows (a repeated (batch, slot) pair keeps its last row).
    - `forget(batch [M], slots [M])`: those slots hold the initial word again, as if not written
      since the last reset; O(M) plus amortised structure work, never a rebuild. Forgetting the
      slots an update appended, after restoring the ones it overwrote with update_entries, undoes
      it: an ExactIndex is then bit for bit as before (row order, so the order of equal scores).
    - `search(queries [B, R, W], k)` -> (scores [B, R, K], ids [B, R, K]), sorted by
      score descending, ids distinct per query, cosine similarity
      D(q, M_i) = q . M_i / (||q||_eps ||M_i||_eps), ||x||_eps = sqrt(sum x^2 + 1e-6)
      (as reference/dnc.py), over all N slots: written rows and the initial word of the
      unwritten ones. Exact for ExactIndex; approximate (recall < 1) for FaissIndex, whose
      candidates are still scored exactly against the current rows. Not differentiable:
      the scores rank; the memory module recomputes weights with ops.sparse_read on the ids.
    - `load(rows [B, N, W])` writes every slot at once (a preloaded memory): the same as
      reset() then update(rows, all N slot ids), but an approximate index builds its structure
      once from all N rows instead of growing it update by update.
    - `rebuild()` rebuilds any approximate structure from the current rows now.
    - `reset(mask [B] bool | None)` forgets the written rows of the masked batch rows
      (all if None): they hold the initial word again. Costs O(rows written), not O(N).
    - `stats()` -> IndexStats.
    Indexes are not thread-safe; one memory module owns one.

    Host and device: an index reads tensors on the host and keeps per-row counts there
    (`on_host`) unless it is `sync_free` and its map lives on a GPU, or on the CPU holds at most
    DENSE_VALUES values (a small memory, where O(N) work a step costs less). Then it never reads a
    value back (each read would be a sync with the host): it stores rows by slot, unwritten
    slots holding the initial word, so _search scores all N slots and the map `_slot` alone
    says which are written; update, forget, search and reset are device ops only (repeated ids are
    deduplicated by sorting, never by torch.unique).
    """

    sync_free: bool = False
    """Whether the implementation has the device path above (ExactIndex has)."""

    row_dtype: torch.dtype = torch.float32
    """The dtype rows are stored in (queries are normalised in float64, then cast to it)."""

    def __init__(
        self,
        batch_size: int,
        num_slots: int,
        word_size: int,
        *,
        initial: Tensor | None = None,
        map_device: torch.device | str = "cpu",
    ) -> None:
        for name, value in (("batch_size B", batch_size), ("num_slots N", num_slots), ("word_size W", word_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        self.batch_size = batch_size
        self.num_slots = num_slots
        self.word_size = word_size
        # _slot[b, i]: where slot i of batch row b lives in the implementation's storage;
        # -1 means unwritten (holds the initial word). Implementations define the other codes.
        self._slot = torch.full((batch_size, num_slots), -1, dtype=torch.int64, device=map_device)
        small = batch_size * num_slots * word_size <= DENSE_VALUES
        self.on_host = not self.sync_free or (_checks.on_host(map_device) and not small)
        # _cursor[b]: every slot below it is written, so the search for unwritten ids starts there.
        self._cursor = [0] * batch_size
        self._rows = [0] * batch_size
        self._merges = 0
        self._merge_seconds = 0.0
        self._rebuilds = 0
        self._build_seconds = 0.0
        self.initial = torch.zeros(word_size) if initial is None else initial

    # ----- the initial word of unwritten slots

    @property
    def initial(self) -> Tensor:
        """The word every unwritten slot holds: [B, W] (a [W] word is shared by all batch rows)."""
        return self._initial

    @initial.setter
    def initial(self, word: Tensor) -> None:
        if not isinstance(word, Tensor) or not word.is_floating_point():
            raise ValueError(f"initial must be a float tensor [W] or [B, W]; got {word!r}")
        if word.dim() == 1:
            word = word.unsqueeze(0).expand(self.batch_size, -1)
        if tuple(word.shape) != (self.batch_size, self.word_size):
            raise ValueError(
                f"initial must be [W] or [B, W] with B={self.batch_size}, W={self.word_size}; got {list(word.shape)}"
            )
        check_finite("initial", word)
        self._initial = word.detach().to(torch.float64)
        self._initial_unit = _unit(self._initial, torch.float64)

    # ----- public interface

    def update(self, rows: Tensor, ids: Tensor) -> None:
        """Write rows [B, J, W] at slot ids [B, J] (int64): replaces any earlier content of those slots."""
        self._check_batch("rows", rows, 3)
        if rows.shape[2] != self.word_size:
            raise ValueError(f"rows must be [B, J, W] with W={self.word_size}; got {list(rows.shape)}")
        if not rows.is_floating_point():
            raise ValueError(f"rows must be a floating-point tensor; got {rows.dtype}")
        self._check_batch("ids", ids, 2)
        if ids.dtype != torch.int64:
            raise ValueError(f"ids must be int64 slot ids; got {ids.dtype}")
        if ids.shape[1] != rows.shape[1]:
            raise ValueError(f"ids must be [B, J] with J={rows.shape[1]} (from rows); got {list(ids.shape)}")
        if ids.device != rows.device:
            raise ValueError(f"ids is on {ids.device} but rows is on {rows.device}; put both on one device")
        check_indices("ids", ids, self.num_slots)
        check_finite("rows", rows)
        if ids.numel() == 0:
            return
        with region("index.update"):
            rows = rows.detach()
            if self.on_host and ids.device.type == "cpu":
                # a step's write: the ascending test and the keys in numpy (a few us, not a few torch ops)
                slots = ids.numpy()
                if slots.shape[1] == 1 or bool((slots[:, 1:] > slots[:, :-1]).all()):
                    self._update_ascending(rows, ids)
                    return
                keys = slots + np.arange(self.batch_size).reshape(-1, 1) * self.num_slots
                self._write_keys(keys.ravel(), rows.reshape(-1, self.word_size))
                return
            if self.on_host and (ids.shape[1] == 1 or bool((ids[:, 1:] > ids[:, :-1]).all())):
                self._update_ascending(rows, ids)
                return
            batch = torch.arange(self.batch_size, device=ids.device).unsqueeze(1).expand_as(ids)
            self._write(batch.flatten(), ids.flatten(), rows.reshape(-1, self.word_size))

    add = update

    def update_entries(self, batch: Tensor, slots: Tensor, rows: Tensor) -> None:
        """Write rows [M, W] at (batch rows batch [M], slots [M]), both int64: update() for M entries
        anywhere in the B memories (a repeated pair keeps its last row; M = 0 writes nothing)."""
        self._check_entries(batch, slots, rows)
        if batch.numel() == 0:
            return
        with region("index.update"):
            self._write(batch, slots, rows.detach())

    def forget(self, batch: Tensor, slots: Tensor) -> None:
        """Unwrite (batch rows batch [M], slots [M]), both int64: they hold the initial word again, as if
        not written since the last reset (an unwritten slot stays so). O(M) plus amortised index work."""
        self._check_entries(batch, slots)
        if batch.numel() == 0:
            return
        with region("index.forget"):
            batch, slots = batch.to(self._slot.device), slots.to(self._slot.device)
            if not self.on_host:
                self._forget_on_device(batch, slots)
                return
            keys = torch.unique(batch * self.num_slots + slots)  # sorted, distinct
            batch, slots = keys // self.num_slots, keys % self.num_slots
            written = self._slot[batch, slots] != -1
            batch, slots = batch[written], slots[written]
            if batch.numel() == 0:
                return
            self._forget(batch, slots)
            forgotten = torch.bincount(batch, minlength=self.batch_size).tolist()
            self._rows = [rows - count for rows, count in zip(self._rows, forgotten, strict=True)]
            lowest = torch.full((self.batch_size,), self.num_slots, device=slots.device)
            lowest = lowest.scatter_reduce(0, batch, slots, reduce="amin").tolist()
            self._cursor = [min(cursor, low) for cursor, low in zip(self._cursor, lowest, strict=True)]

    def load(self, rows: Tensor) -> None:
        """Write every slot at once, rows [B, N, W] (a preloaded memory, the full regime): what
        reset() then update(rows, [0, 1, ..., N-1] per batch row) leaves, built in one go.

        rows may be the memory itself: it is read in chunks of slots and never copied whole.
        This default updates chunk by chunk; an approximate index overrides it to build its
        structure once from all N rows instead of growing (and retraining) it chunk by chunk.
        """
        expected = (self.batch_size, self.num_slots, self.word_size)
        if not isinstance(rows, Tensor) or tuple(rows.shape) != expected:
            shape = list(rows.shape) if isinstance(rows, Tensor) else type(rows).__name__
            sizes = f"B={self.batch_size}, N={self.num_slots}, W={self.word_size}"
            raise ValueError(f"rows must be [B, N, W] with {sizes}; got {shape}")
        if not rows.is_floating_point():
            raise ValueError(f"rows must be a floating-point tensor; got {rows.dtype}")
        columns = max(1, UPDATE_CHUNK // self.batch_size)
        for start in range(0, self.num_slots, columns):
            check_finite("rows", rows[:, start : start + columns])
        with region("index.load"):
            self.reset()
            self._load(rows.detach())

    def _load(self, rows: Tensor) -> None:
        """load() after its checks and a reset: by default ascending updates, chunk by chunk."""
        columns = max(1, UPDATE_CHUNK // self.batch_size)
        for start in range(0, self.num_slots, columns):
            end = min(start + columns, self.num_slots)
            slots = torch.arange(start, end, device=rows.device).expand(self.batch_size, -1)
            self.update(rows[:, start:end], slots)

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The K most similar slots per query: queries [B, R, W] -> (scores [B, R, K], ids [B, R, K] int64).

        Results are on the queries' device; scores are float32 (float64 for a float64 ExactIndex).
        """
        self._check_batch("queries", queries, 3)
        if queries.shape[2] != self.word_size:
            raise ValueError(f"queries must be [B, R, W] with W={self.word_size}; got {list(queries.shape)}")
        if not queries.is_floating_point():
            raise ValueError(f"queries must be a floating-point tensor; got {queries.dtype}")
        if not isinstance(k, int) or not 1 <= k <= self.num_slots:
            raise ValueError(f"k must be an int in [1, N={self.num_slots}]; got k={k!r}")
        check_finite("queries", queries)
        with region("index.search"):
            unit = _unit(queries.detach(), torch.float64)
            scores, ids = self._search(unit, k)
            scores, ids = self._with_unwritten(unit, scores, ids, k)
        return scores.to(queries.device), ids.to(queries.device)

    @abc.abstractmethod
    def rebuild(self) -> None:
        """Rebuild the approximate structure from the current rows now (no-op for an exact index)."""

    def reset(self, mask: Tensor | None = None) -> None:
        """Forget the written rows of batch rows where mask [B] is True (all when None)."""
        if mask is None:
            mask = torch.ones(self.batch_size, dtype=torch.bool, device=self._slot.device)
        elif not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (self.batch_size,):
            shape = list(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"mask must be a bool tensor [B] with B={self.batch_size}; got {shape}")
        if not self.on_host:
            self._reset_on_device(mask.to(self._slot.device))
            return
        for b in mask.nonzero().flatten().tolist():
            self._reset_row(b)
            self._cursor[b] = 0
            self._rows[b] = 0

    def unwritten(self, count: int) -> Tensor:
        """The `count` lowest unwritten slot ids per batch row: [B, count] int64, padded with -1."""
        if not self.on_host:
            # O(N) on the device, with no sync: unwritten slots keep their id, written ones sort last
            slot_ids = torch.arange(self.num_slots, device=self._slot.device)
            free = torch.where(self._slot < 0, slot_ids, self.num_slots)
            lowest = free.topk(min(count, self.num_slots), dim=-1, largest=False).values
            return lowest.masked_fill(lowest == self.num_slots, -1)
        # One window above each batch row's cursor, all batch rows at once: writes usually fill
        # slots from the bottom (the LRU slot is the lowest unwritten one), so it mostly holds
        # `count` unwritten slots; a batch row where it does not is scanned on its own.
        # In numpy on a view of the map: a few small ops, each a fraction of a torch op's dispatch.
        window = min(max(64, 2 * count), self.num_slots)
        slot_map = self._slot.numpy()
        positions = np.asarray(self._cursor).reshape(-1, 1) + np.arange(window)
        inside = positions < self.num_slots
        rows = np.arange(self.batch_size).reshape(-1, 1)
        free = inside & (slot_map[rows, np.minimum(positions, self.num_slots - 1)] == -1)
        # positions ascend along a row: its first `count` free ones are its lowest
        first_free = np.argsort(~free, axis=1, kind="stable")[:, :count]
        lowest = np.where(free[rows, first_free], positions[rows, first_free], -1)
        if lowest.shape[1] < count:
            lowest = np.pad(lowest, ((0, 0), (0, count - lowest.shape[1])), constant_values=-1)
        out = torch.from_numpy(lowest)
        # a batch row whose window found fewer than count and did not reach N: scanned further
        short = ((free.sum(-1) < count) & inside[:, -1]).tolist()
        for b, first in enumerate(lowest[:, 0].tolist()):
            if short[b]:
                ids = self._unwritten_row(b, count)
                out[b] = -1
                out[b, : ids.numel()] = ids.cpu()
            else:
                self._cursor[b] = self.num_slots if first < 0 else first
        return out

    def stats(self) -> IndexStats:
        return IndexStats(
            rows=sum(self._rows) if self.on_host else int((self._slot >= 0).sum()),
            buffered=self._buffered(),
            tombstones=self._tombstones(),
            merges=self._merges,
            merge_seconds=self._merge_seconds,
            rebuilds=self._rebuilds,
            build_seconds=self._build_seconds,
            bytes=self._bytes() + self._slot.numel() * self._slot.element_size(),
        )

    # ----- what an implementation provides

    def _stored(self, rows: Tensor) -> Tensor:
        """What _update receives for written rows [J, W]: x / ||x||_eps in row_dtype, so inner
        products are eps-cosines. An index that scores with the eps-cosine itself keeps rows as written."""
        return _unit(rows, self.row_dtype)

    @abc.abstractmethod
    def _update(self, batch: Tensor, slots: Tensor, unit: Tensor) -> None:
        """Store rows [J', W] (as _stored made them) at (batch [J'], slots [J']), sorted by batch row
        then slot. On the host pairs are distinct and _slot and _rows must be kept current; on the
        device path a pair may repeat (always with the same row) and _slot must mark the written slots."""

    @abc.abstractmethod
    def _search(self, unit: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Top-K over the written rows for unit queries [B, R, W] (float64): (scores, ids) [B, R, K],
        padded with -inf and -1 where a batch row holds fewer than K written rows."""

    @abc.abstractmethod
    def _forget(self, batch: Tensor, slots: Tensor) -> None:
        """Unwrite the written slots (batch [M], slots [M]), distinct and sorted, on the map's device: drop
        their rows and set their _slot entries to -1 (forget() then updates _rows and _cursor)."""

    def _forget_on_device(self, batch: Tensor, slots: Tensor) -> None:
        """The device path's forget (pairs may repeat): slots (batch [M], slots [M]) hold the initial word again."""
        self._slot[batch, slots] = -1

    def _reset_on_device(self, mask: Tensor) -> None:
        """The device path's reset: batch rows where mask [B] is True hold the initial word again."""
        self._slot.masked_fill_(mask.unsqueeze(-1), -1)

    @abc.abstractmethod
    def _reset_row(self, b: int) -> None:
        """Forget batch row b's written rows (and set their _slot entries back to -1)."""

    def _buffered(self) -> int:
        return 0

    def _tombstones(self) -> int:
        return 0

    @abc.abstractmethod
    def _bytes(self) -> int: ...

    # ----- shared machinery

    def _write(self, batch: Tensor, slots: Tensor, rows: Tensor) -> None:
        """update() and update_entries() after their checks: rows [M, W] at (batch [M], slots [M])."""
        keys = batch * self.num_slots + slots
        if self.on_host and keys.device.type == "cpu":
            self._write_keys(keys.numpy(), rows)
            return
        batch, slots, order = (_last_writes if self.on_host else _sorted_writes)(keys, self.num_slots)
        # In chunks, so a whole preloaded memory (J = N) is never copied or widened at once.
        for start in range(0, order.numel(), UPDATE_CHUNK):
            chunk = slice(start, start + UPDATE_CHUNK)
            self._update(batch[chunk], slots[chunk], self._stored(rows[order[chunk]]))

    def _write_keys(self, keys: np.ndarray, rows: Tensor) -> None:
        """_write on the host with keys [M] (batch row * N + slot) in numpy: each (batch row, slot)
        once, sorted, with its last row (a slot written twice in one call keeps its last row)."""
        reversed_keys = keys[::-1]
        unique, first_from_end = np.unique(reversed_keys, return_index=True)
        order = len(keys) - 1 - first_from_end
        batch, slots = unique // self.num_slots, unique % self.num_slots
        for start in range(0, len(order), UPDATE_CHUNK):
            chunk = slice(start, start + UPDATE_CHUNK)
            picked = rows.index_select(0, torch.from_numpy(order[chunk]))
            self._update(torch.from_numpy(batch[chunk]), torch.from_numpy(slots[chunk]), self._stored(picked))

    def _check_entries(self, batch: object, slots: object, rows: object = None) -> None:
        """The checks of update_entries (rows given) and forget: batch [M], slots [M] int64, rows [M, W]."""
        shapes = Shapes()
        shapes.sizes["W"] = (self.word_size, "the index")
        shapes.check("batch", batch, "M", "index").check("slots", slots, "M", "index")
        if rows is not None:
            shapes.check("rows", rows, "M W")
        check_range("batch", batch, 0, self.batch_size - 1)
        check_indices("slots", slots, self.num_slots)
        if rows is not None:
            check_finite("rows", rows)

    def _check_batch(self, name: str, tensor: object, dims: int) -> None:
        if not isinstance(tensor, Tensor):
            raise ValueError(f"{name} must be a tensor; got {type(tensor).__name__}")
        letters = {"rows": "[B, J, W]", "ids": "[B, J]", "queries": "[B, R, W]"}[name]
        if tensor.dim() != dims or tensor.shape[0] != self.batch_size:
            raise ValueError(f"{name} must be {letters} with B={self.batch_size}; got {list(tensor.shape)}")

    def _timed_merge(self, start: float) -> None:
        self._merges += 1
        self._merge_seconds += time.perf_counter() - start

    def _timed_build(self, start: float) -> None:
        self._rebuilds += 1
        self._build_seconds += time.perf_counter() - start

    def _unwritten_row(self, b: int, count: int) -> Tensor:
        slots = self._slot[b]
        # Every slot below the cursor is written. Writes usually fill slots from the bottom
        # (the LRU slot is the lowest unwritten one), so the cursor advances and scans stay short.
        position, window, found, first = self._cursor[b], max(64, 2 * count), [], None
        while position < self.num_slots and sum(ids.numel() for ids in found) < count:
            free = (slots[position : position + window] == -1).nonzero().flatten() + position
            if free.numel():
                first = int(free[0]) if first is None else first
                found.append(free)
            position, window = position + window, 2 * window
        self._cursor[b] = self.num_slots if first is None else first
        return torch.cat(found)[:count] if found else slots.new_empty(0)

    def _update_ascending(self, rows: Tensor, ids: Tensor) -> None:
        """update() where every batch row's ids ascend (distinct, sorted: a preload chunk): the pairs
        are in _update's order already, so rows go over in blocks of columns, with no sort or gather."""
        columns = max(1, UPDATE_CHUNK // self.batch_size)
        for start in range(0, ids.shape[1], columns):
            block = ids[:, start : start + columns]
            batch = torch.arange(self.batch_size, device=ids.device).repeat_interleave(block.shape[1])
            flat = rows[:, start : start + columns].reshape(-1, self.word_size)
            self._update(batch, block.flatten(), self._stored(flat))

    def _with_unwritten(self, unit: Tensor, scores: Tensor, ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Merge the shared initial word of the unwritten slots into the written rows' top-K (on the
        device path _search scored them already: unwritten rows hold the initial word)."""
        if not self.on_host or all(rows == self.num_slots for rows in self._rows):
            return scores, ids
        pool_ids = self.unwritten(k).to(ids.device)
        initial = self._initial_unit.to(unit.device)
        if unit.device.type == "cpu" and scores.device.type == "cpu":
            # D(q, initial word) [B, R, 1]
            pool_scores = np.matmul(unit.numpy(), initial.numpy()[..., None]).astype(scores.numpy().dtype)
            return _merged_with_pool(scores, ids, pool_scores[..., 0], pool_ids, k)
        pool_scores = torch.einsum("brw,bw->br", unit, initial).to(scores.dtype)
        pool_scores = pool_scores.unsqueeze(-1).expand(-1, -1, k)
        missing = (pool_ids < 0).unsqueeze(1).to(scores.device)
        pool_scores = pool_scores.masked_fill(missing, float("-inf"))
        pool_ids = pool_ids.unsqueeze(1).expand(-1, unit.shape[1], -1)
        # A stable sort keeps the implementation's order among equal scores, written rows first.
        merged_scores, order = torch.cat([scores, pool_scores], -1).sort(dim=-1, descending=True, stable=True)
        merged_ids = torch.cat([ids, pool_ids], -1).gather(-1, order[..., :k])
        return merged_scores[..., :k], merged_ids


def _merged_with_pool(
    scores: Tensor, ids: Tensor, pool_scores: np.ndarray, pool_ids: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """_with_unwritten's merge on the host, in numpy: the written rows' top K (scores, ids [B, R, K])
    and K unwritten slots pool_ids [B, K] (-1: none) that all score pool_scores [B, R], sorted by
    score with a stable sort (written rows first among equals), cut to K."""
    batch, heads = scores.shape[:2]
    pool = np.broadcast_to(pool_scores[..., None], (batch, heads, k))
    missing = (pool_ids.numpy() < 0)[:, None, :]
    merged_scores = np.concatenate([scores.numpy(), np.where(missing, -np.inf, pool).astype(pool.dtype)], -1)
    merged_ids = np.concatenate([ids.numpy(), np.broadcast_to(pool_ids.numpy()[:, None, :], (batch, heads, k))], -1)
    # descending and stable: an ascending stable sort of the negated scores keeps equal scores in order
    order = np.argsort(-merged_scores, axis=-1, kind="stable")[..., :k]
    rows, heads = np.arange(batch).reshape(-1, 1, 1), np.arange(heads).reshape(1, -1, 1)
    return torch.from_numpy(merged_scores[rows, heads, order]), torch.from_numpy(merged_ids[rows, heads, order])


def _unit(x: Tensor, dtype: torch.dtype) -> Tensor:
    """x / ||x||_eps in dtype: then unit(q) . unit(m) is the eps-cosine D(q, m) of reference/dnc.py."""
    x = x.to(dtype)
    return x / safe_norm(x).unsqueeze(-1)


def compaction_moves(batch: Tensor, positions: Tensor, counts: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """How to remove the rows at distinct (batch [M], positions [M]) from a store where batch row b
    holds its rows at positions 0 .. counts[b] - 1: (batch [H], sources [H], targets [H]), each of the
    H holes below a batch row's new count filled with one of its kept rows above it, lowest with
    lowest. Removing a batch row's last rows moves nothing, so its other rows keep their order."""
    removed = torch.bincount(batch, minlength=len(counts))
    kept = torch.tensor(counts, device=batch.device) - removed
    width = max(counts) + 1
    keys = (batch * width + positions).sort().values
    batch = keys // width
    # Batch row b's tail, positions kept[b] .. counts[b] - 1: as many as it removes; its kept rows move.
    rank = torch.arange(keys.numel(), device=keys.device) - (removed.cumsum(0) - removed)[batch]
    tail = batch * width + kept[batch] + rank
    sources = tail[~torch.isin(tail, keys)]
    targets = keys[keys % width < kept[batch]]
    return sources // width, sources % width, targets % width


def _sorted_writes(keys: Tensor, num_slots: int) -> tuple[Tensor, Tensor, Tensor]:
    """Every (batch row, slot) pair of keys [M] (batch row * N + slot), sorted, repeats kept, each with
    the position in keys of its pair's last occurrence (so repeats carry the same row): _last_writes
    without the sync of torch.unique, for indexes on a device that store rows by slot."""
    keys, order = keys.sort(stable=True)
    # stable sort: a pair's last entry in sorted order is its last occurrence in the call
    last = torch.searchsorted(keys, keys, right=True) - 1
    return keys // num_slots, keys % num_slots, order[last]


def _last_writes(keys: Tensor, num_slots: int) -> tuple[Tensor, Tensor, Tensor]:
    """Distinct (batch row, slot) pairs of keys [M] (batch row * N + slot), sorted, each with the position
    of its last occurrence: a slot written twice in one call keeps its last row, as two calls would."""
    unique, inverse = torch.unique(keys, sorted=True, return_inverse=True)
    positions = torch.arange(keys.numel(), device=keys.device)
    last = torch.full_like(unique, -1).scatter_reduce(0, inverse, positions, reduce="amax")
    return unique // num_slots, unique % num_slots, last
