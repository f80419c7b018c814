"""TorchIVFIndex: an inverted-file index in pure torch, so approximate search runs on the GPU without faiss.

Per batch row: `nlist` centroids from spherical k-means (a few Lloyd iterations on a
sample of the rows, on the index's device), every indexed row filed under its nearest
centroid, and the lists kept as CSR: store rows sorted by list (`_order`) plus offsets.
A search probes the `nprobe` lists whose centroids score highest and scores every
candidate in them exactly (x / ||x||_eps dot products against the current rows).

Writes go to an exact buffer (`buffer_rows` rows per batch row, searched by brute force)
and are merged into the lists in one batch when a batch row's buffer is full, or with a
write too large for it (DESIGN.md, "The index"). An overwritten indexed row leaves a tombstone (its entry's id
becomes -1, filtered at search) and its new content goes to the buffer, so stale content
is never returned. A batch row is rebuilt (k-means retrained on its live rows, tombstones
dropped, store compacted) when its tombstones pass `rebuild_fraction` of its entries or
the rows filed since its last training outnumber the rows it was trained on (the lists
drift from the centroids); each rebuild is at least a doubling or a `rebuild_fraction`
of fresh writes, so rebuilds are amortised O(1) per row.

Everything is batched over the B batch rows (one tensor [B, ...] each, padded); no
Python loop over B in search. Search issues no host sync: how many lists to probe and
how many candidates each query can meet are known on the host from the list lengths
(copied once per merge). The syncs that remain are in update (unique slot ids, counts of
new rows) and in the base class's merge of unwritten slots (Index.unwritten), while some
slots are unwritten.
"""

import math
import time

import torch
from torch import Tensor

from sparsemem.index.base import Index
from sparsemem.index.buffer import WriteBuffer
from sparsemem.reference.dnc import safe_norm

LISTS_PER_SQRT_ROWS = 2.0
"""Default nlist = 2 sqrt(rows): lists of ~sqrt(rows) / 2 rows, the best recall per row scanned of the
sweep in bench/results/index_ivf_sweep.json (more lists build slower)."""
MIN_LIST_ROWS = 16
"""k-means never makes lists of fewer rows than this on average (few rows, few lists)."""


def default_nlist(rows: int) -> int:
    """Lists for a batch row of `rows` indexed rows: ~2 sqrt(rows), at most rows / MIN_LIST_ROWS."""
    return max(1, min(round(LISTS_PER_SQRT_ROWS * math.sqrt(rows)), rows // MIN_LIST_ROWS))


def default_nprobe(nlist: int) -> int:
    """Lists probed per query: 1/32 of the lists (1/32 of the rows scanned), at least 8: recall@8 near 1
    with default_nlist lists (bench/results/index_ivf_sweep.json)."""
    return max(8, nlist // 32)


class TorchIVFIndex(Index):
    """Approximate top-K cosine search with an inverted-file index in torch, on any device.

    nlist: lists per batch row (None: default_nlist of the rows at each training).
    nprobe: lists probed per query (None: default_nprobe(nlist)); widened when the probed
    lists could hold fewer than K live rows, so K = N still returns K distinct written rows.
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
        nlist: int | None = None,
        nprobe: int | None = None,
        buffer_rows: int = 4096,
        rebuild_fraction: float = 0.25,
        kmeans_iterations: int = 8,
        kmeans_samples: int = 32,
        chunk_rows: int = 2**18,
        seed: int = 0,
    ) -> None:
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype; got {dtype}")
        for name, value in (
            ("nlist", nlist),
            ("nprobe", nprobe),
            ("buffer_rows", buffer_rows),
            ("kmeans_iterations", kmeans_iterations),
            ("kmeans_samples", kmeans_samples),
            ("chunk_rows", chunk_rows),
        ):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if not 0 < rebuild_fraction <= 1:
            raise ValueError(f"rebuild_fraction must be in (0, 1]; got {rebuild_fraction}")
        self.device = torch.device(device)
        self.dtype = self.row_dtype = dtype
        self._plans: dict[int, tuple[int, int]] = {}
        self.nlist, self.nprobe = nlist, nprobe
        self.buffer_rows = min(buffer_rows, num_slots)
        self.rebuild_fraction = rebuild_fraction
        self.kmeans_iterations, self.kmeans_samples = kmeans_iterations, kmeans_samples
        self.chunk_rows = chunk_rows
        self._generator = torch.Generator(device=self.device).manual_seed(seed)
        super().__init__(batch_size, num_slots, word_size, initial=initial, map_device=self.device)
        # _slot codes: -1 unwritten, >= 0 the store row holding the slot, <= -2 buffer row -2 - code.
        B = batch_size
        self._buffer = WriteBuffer(self._slot, self.buffer_rows, word_size, dtype, self.device)
        # The store: indexed rows in the order they were filed; _entry_ids[b, e] is the slot of
        # entry e (-1: a tombstone, or past the batch row's entries), _entry_list[b, e] its list.
        self._store = torch.empty(B, 0, word_size, dtype=dtype, device=self.device)
        self._entry_ids = torch.empty(B, 0, dtype=torch.int64, device=self.device)
        self._entry_list = torch.empty(B, 0, dtype=torch.int64, device=self.device)
        self._entries = [0] * B
        self._dead = [0] * B  # tombstones in the store
        self._listed_dead = [0] * B  # of those, the ones still filed in the lists (since the last sort)
        self._trained = [0] * B  # rows at the last training (0: never trained)
        self._fresh = [0] * B  # entries filed since the last training
        # The lists: centroids [B, L, W] (a batch row trained on fewer than L lists masks the
        # rest with bias -inf), CSR order [B, C] and offsets [B, L + 1], and on the host, prefix
        # sums of each batch row's list lengths sorted ascending and descending [B, L + 1].
        self._centroids: Tensor | None = None
        self._bias = torch.empty(B, 0, dtype=dtype, device=self.device)
        self._order = torch.empty(B, 0, dtype=torch.int64, device=self.device)
        self._offsets = torch.zeros(B, 1, dtype=torch.int64, device=self.device)
        self._shortest = torch.zeros(B, 1, dtype=torch.int64)
        self._longest = torch.zeros(B, 1, dtype=torch.int64)

    # ----- writes

    def _update(self, batch: Tensor, slots: Tensor, unit: Tensor) -> None:
        batch, slots = batch.to(self.device), slots.to(self.device)
        unit = unit.to(device=self.device, dtype=self.dtype)
        codes = self._slot[batch, slots]
        buffered = codes <= -2
        self._buffer.overwrite(batch[buffered], codes[buffered], unit[buffered])
        indexed = codes >= 0
        self._tombstone(batch[indexed], codes[indexed])
        new = self._per_row(batch[codes == -1])
        self._rows = [a + n for a, n in zip(self._rows, new, strict=True)]
        appended = ~buffered
        batch, slots, unit = batch[appended], slots[appended], unit[appended]
        added = self._per_row(batch)
        if any(held + count > self.buffer_rows for held, count in zip(self._buffer.held, added, strict=True)):
            # The buffer cannot take them: file what it holds and these rows in one merge.
            self._merge(batch, slots, unit, added)
            return
        positions = torch.tensor(self._buffer.held, device=self.device)[batch] + _rank(batch, added)
        self._buffer.put(batch, positions, slots, unit)
        self._buffer.grow(added)
        if max(self._buffer.held) == self.buffer_rows:  # a full buffer is merged at once, as FaissIndex does
            self._merge(batch[:0], slots[:0], unit[:0], [0] * self.batch_size)

    def _forget(self, batch: Tensor, slots: Tensor) -> None:
        codes = self._slot[batch, slots]
        indexed, buffered = codes >= 0, codes <= -2
        self._tombstone(batch[indexed], codes[indexed])
        self._buffer.remove(batch[buffered], codes[buffered])
        self._slot[batch, slots] = -1

    def _tombstone(self, batch: Tensor, entries: Tensor) -> None:
        """Store entries [M] of batch rows batch [M] become tombstones (their slots were overwritten or
        forgotten): filtered at search, dropped when the batch row is next rebuilt."""
        if not batch.numel():
            return
        self._entry_ids[batch, entries] = -1
        dead = self._per_row(batch)
        self._dead = [a + d for a, d in zip(self._dead, dead, strict=True)]
        self._listed_dead = [a + d for a, d in zip(self._listed_dead, dead, strict=True)]
        self._plans.clear()

    def _per_row(self, batch: Tensor) -> list[int]:
        return torch.bincount(batch, minlength=self.batch_size).tolist()

    def _merge(self, batch: Tensor, slots: Tensor, unit: Tensor, added: list[int], rebuild_all: bool = False) -> None:
        """File the buffer's rows and (batch, slots, unit) rows (sorted by batch row) into the lists,
        rebuilding the batch rows whose lists have drifted or hold too many tombstones."""
        start = time.perf_counter()
        held_batch, held_slots, held_unit = self._buffer.held_rows()
        batch = torch.cat([held_batch, batch])
        order = torch.sort(batch, stable=True).indices  # buffer rows first within each batch row
        batch = batch[order]
        slots = torch.cat([held_slots, slots])[order]
        unit = torch.cat([held_unit, unit])[order]
        added = [a + h for a, h in zip(added, self._buffer.held, strict=True)]
        self._buffer.clear()
        rebuilt = [
            b
            for b in range(self.batch_size)
            if rebuild_all
            or self._trained[b] == 0
            or self._fresh[b] + added[b] > self._trained[b]
            or self._dead[b] > self.rebuild_fraction * (self._entries[b] + added[b])
        ]
        rebuilt = [b for b in rebuilt if self._entries[b] - self._dead[b] + added[b] > 0]
        chosen = torch.zeros(self.batch_size, dtype=torch.bool, device=self.device)
        chosen[rebuilt] = True
        into_rebuild = chosen[batch]
        if rebuilt:
            self._rebuild(rebuilt, batch[into_rebuild], slots[into_rebuild], unit[into_rebuild])
        if len(rebuilt) < self.batch_size:
            kept = ~into_rebuild
            self._file(
                batch[kept], slots[kept], unit[kept], [0 if b in rebuilt else added[b] for b in range(len(added))]
            )
        self._sort_lists()
        # Counted per batch row, as IndexStats sums over B; a call that retrains any row is build time.
        seconds = time.perf_counter() - start
        filed = sum(1 for b in range(self.batch_size) if b not in rebuilt and added[b])
        self._rebuilds += len(rebuilt)
        self._merges += filed
        if rebuilt:
            self._build_seconds += seconds
        else:
            self._merge_seconds += seconds

    def _file(self, batch: Tensor, slots: Tensor, unit: Tensor, added: list[int]) -> None:
        """Append rows (sorted by batch row) to the store under their nearest lists."""
        if not batch.numel():
            return
        self._reserve(max(e + a for e, a in zip(self._entries, added, strict=True)))
        rank = _rank(batch, added)
        padded = unit.new_zeros(self.batch_size, max(added), self.word_size)
        padded[batch, rank] = unit
        lists = self._nearest(padded, self._centroids, self._bias)[batch, rank]
        rows = torch.tensor(self._entries, device=self.device)[batch] + rank
        self._store[batch, rows] = unit
        self._entry_ids[batch, rows] = slots
        self._entry_list[batch, rows] = lists
        self._slot[batch, slots] = rows
        self._entries = [e + a for e, a in zip(self._entries, added, strict=True)]
        self._fresh = [f + a for f, a in zip(self._fresh, added, strict=True)]

    def _rebuild(self, rebuilt: list[int], batch: Tensor, slots: Tensor, unit: Tensor) -> None:
        """Retrain batch rows `rebuilt` on their live rows plus (batch, slots, unit), compacting their store."""
        chosen = torch.tensor(rebuilt, device=self.device)
        live = self._entry_ids[chosen] >= 0
        which, rows = live.nonzero().unbind(1)
        batch = torch.cat([chosen[which], batch])
        order = torch.sort(batch, stable=True).indices
        batch = batch[order]
        slots = torch.cat([self._entry_ids[chosen[which], rows], slots])[order]
        unit = torch.cat([self._store[chosen[which], rows], unit])[order]
        counts = self._per_row(batch)
        self._reserve(max(counts))
        rank = _rank(batch, counts)
        # Train on a padded [B', J, W] view of the chosen batch rows.
        local = torch.full((self.batch_size,), -1, dtype=torch.int64, device=self.device)
        local[chosen] = torch.arange(len(rebuilt), device=self.device)
        padded = unit.new_zeros(len(rebuilt), max(counts[b] for b in rebuilt), self.word_size)
        padded[local[batch], rank] = unit
        lists_per_row = [min(self.nlist or default_nlist(counts[b]), counts[b]) for b in rebuilt]
        centroids, bias = self._kmeans(padded, [counts[b] for b in rebuilt], lists_per_row)
        lists = self._nearest(padded, centroids, bias)[local[batch], rank]
        self._fit_lists(centroids.shape[1])
        self._centroids[chosen] = 0
        self._centroids[chosen, : centroids.shape[1]] = centroids
        self._bias[chosen] = float("-inf")
        self._bias[chosen, : centroids.shape[1]] = bias
        self._entry_ids[chosen] = -1
        self._store[batch, rank] = unit
        self._entry_ids[batch, rank] = slots
        self._entry_list[batch, rank] = lists
        self._slot[batch, slots] = rank
        for b in rebuilt:
            self._entries[b] = self._trained[b] = counts[b]
            self._dead[b] = self._fresh[b] = 0

    def _kmeans(self, points: Tensor, counts: list[int], lists_per_row: list[int]) -> tuple[Tensor, Tensor]:
        """Spherical k-means on unit points [B', J, W] (the first counts[i] of row i are real):
        (centroids [B', L, W] unit, bias [B', L]: 0 for row i's first lists_per_row[i] lists, else -inf)."""
        rows, lists, size = points.shape[0], max(lists_per_row), points.shape[1]
        count = torch.tensor(counts, device=self.device).unsqueeze(1)
        # A random permutation of each row's points (padding sorts last), cut to kmeans_samples
        # points per list and repeated where a row has fewer; its first points seed the centroids.
        keys = torch.rand(rows, size, generator=self._generator, device=self.device)
        order = keys.masked_fill(torch.arange(size, device=self.device) >= count, 2).argsort(1)
        picks = order.gather(1, torch.arange(min(size, lists * self.kmeans_samples), device=self.device) % count)
        sample = points.gather(1, picks.unsqueeze(-1).expand(-1, -1, self.word_size))
        used = torch.arange(lists, device=self.device) < torch.tensor(lists_per_row, device=self.device).unsqueeze(1)
        bias = torch.zeros(rows, lists, dtype=self.dtype, device=self.device).masked_fill(~used, float("-inf"))
        centroids = sample[:, :lists].clone()
        for _ in range(self.kmeans_iterations):
            nearest = self._nearest(sample, centroids, bias)
            sums = torch.zeros_like(centroids).scatter_add_(1, nearest.unsqueeze(-1).expand_as(sample), sample)
            sizes = torch.zeros(rows, lists, dtype=self.dtype, device=self.device)
            sizes.scatter_add_(1, nearest, torch.ones_like(nearest, dtype=self.dtype))
            # an empty list keeps its centroid (its seed point)
            centroids = torch.where((sizes > 0).unsqueeze(-1), sums / safe_norm(sums).unsqueeze(-1), centroids)
        return centroids, bias

    def _nearest(self, points: Tensor, centroids: Tensor, bias: Tensor) -> Tensor:
        """The list of each of points [B', J, W]: argmax over centroids [B', L, W] of dot + bias [B', L]."""
        step = max(1, self.chunk_rows * 16 // max(1, points.shape[0] * centroids.shape[1]))
        parts = [
            torch.baddbmm(bias.unsqueeze(1), points[:, start : start + step], centroids.transpose(1, 2)).argmax(-1)
            for start in range(0, points.shape[1], step)
        ]
        return torch.cat(parts, 1) if parts else points.new_empty(points.shape[:2], dtype=torch.int64)

    def _reserve(self, entries: int) -> None:
        capacity = self._store.shape[1]
        if entries <= capacity:
            return
        # Doubling keeps appends amortised O(1) per row up to N rows; past N only tombstones grow it (until a
        # rebuild drops them), in steps of 8 buffers, so a full memory does not hold room for 2N rows.
        capacity = max(entries, min(2 * capacity, self.num_slots), capacity + 8 * self.buffer_rows, 64)
        old = self._store.shape[1]
        store = self._store.new_empty(self.batch_size, capacity, self.word_size)
        store[:, :old] = self._store
        self._store = store
        self._entry_ids = torch.cat(
            [self._entry_ids, self._entry_ids.new_full((self.batch_size, capacity - old), -1)], 1
        )
        self._entry_list = torch.cat([self._entry_list, self._entry_list.new_zeros(self.batch_size, capacity - old)], 1)

    def _fit_lists(self, lists: int) -> None:
        if self._centroids is None:
            self._centroids = torch.zeros(self.batch_size, lists, self.word_size, dtype=self.dtype, device=self.device)
            self._bias = torch.full((self.batch_size, lists), float("-inf"), dtype=self.dtype, device=self.device)
        elif lists > self._centroids.shape[1]:
            grow = lists - self._centroids.shape[1]
            self._centroids = torch.cat(
                [self._centroids, self._centroids.new_zeros(self.batch_size, grow, self.word_size)], 1
            )
            self._bias = torch.cat([self._bias, self._bias.new_full((self.batch_size, grow), float("-inf"))], 1)

    def _sort_lists(self) -> None:
        """CSR lists from the live entries: store rows sorted by list, offsets, and host-side length sums."""
        lists = self._centroids.shape[1]
        key = self._entry_list.masked_fill(self._entry_ids < 0, lists)  # tombstones and padding sort last
        self._order = torch.sort(key, dim=1, stable=True).indices
        lengths = torch.zeros(self.batch_size, lists + 1, dtype=torch.int64, device=self.device)
        lengths.scatter_add_(1, key, torch.ones_like(key))
        lengths = lengths[:, :lists]
        self._offsets = torch.nn.functional.pad(lengths.cumsum(1), (1, 0))
        on_host = lengths.cpu()
        self._shortest = torch.nn.functional.pad(on_host.sort(1).values.cumsum(1), (1, 0))
        self._longest = torch.nn.functional.pad(on_host.sort(1, descending=True).values.cumsum(1), (1, 0))
        self._listed_dead = [0] * self.batch_size
        self._plans.clear()

    def rebuild(self) -> None:
        """Merge every buffer and retrain every batch row's lists on its live rows now."""
        if not any(self._rows):
            return
        empty = torch.empty(0, dtype=torch.int64, device=self.device)
        no_rows = self._buffer.rows.new_empty(0, self.word_size)
        self._merge(empty, empty, no_rows, [0] * self.batch_size, rebuild_all=True)

    # ----- search

    def _search(self, unit: Tensor, k: int) -> tuple[Tensor, Tensor]:
        unit = unit.to(device=self.device, dtype=self.dtype)
        scores, ids = self._buffer.search(unit, k)
        if self._centroids is not None and any(e > d for e, d in zip(self._entries, self._dead, strict=True)):
            list_scores, list_ids = self._search_lists(unit, k)
            scores, order = torch.cat([scores, list_scores], -1).topk(k, dim=-1)
            ids = torch.cat([ids, list_ids], -1).gather(-1, order)
        return scores, ids

    @property
    def nprobe(self) -> int | None:
        """Lists probed per query at least (None: default_nprobe(nlist)); settable between searches."""
        return self._nprobe

    @nprobe.setter
    def nprobe(self, nprobe: int | None) -> None:
        self._nprobe = nprobe
        self._plans.clear()  # plans are cached per K for one nprobe

    def probe_plan(self, k: int) -> tuple[int, int]:
        """(lists to probe, candidates a query can meet at most) for top-K, from host-side list lengths.

        Probes at least nprobe lists, and enough that even the shortest lists probed hold
        min(K, live rows) live entries in every batch row: a search never comes back short.
        """
        if k not in self._plans:
            lists = self._centroids.shape[1]
            nprobe = self.nprobe or default_nprobe(lists)
            live = torch.tensor(self._shortest[:, -1].tolist()) - torch.tensor(self._listed_dead)
            need = live.clamp(max=k) + torch.tensor(self._listed_dead)
            enough = (self._shortest >= need.unsqueeze(1)).all(0)
            enough[: min(nprobe, lists)] = False
            enough[-1] = True
            probes = int(enough.nonzero()[0])
            self._plans[k] = (probes, int(self._longest[:, probes].max()))
        return self._plans[k]

    def _search_lists(self, unit: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Top-K over the filed rows: probe the best lists, gather their rows chunk by chunk, score exactly."""
        probes, candidates = self.probe_plan(k)
        B, heads = self.batch_size, unit.shape[1]
        probed = torch.baddbmm(self._bias.unsqueeze(1), unit, self._centroids.transpose(1, 2)).topk(probes, -1).indices
        starts = self._offsets.gather(1, probed.flatten(1)).view_as(probed)
        lengths = self._offsets.gather(1, probed.flatten(1) + 1).view_as(probed) - starts
        ends = lengths.cumsum(-1)  # candidate c of a query lies in probe p where ends[p-1] <= c < ends[p]
        if unit.device.type == "cpu":
            # Reading the longest query's candidate count costs nothing on the CPU and saves scoring
            # padding; on a GPU it would be a host sync, so the bound from the host stands.
            candidates = int(ends[..., -1].max())
        shift = starts - (ends - lengths)
        best_scores = unit.new_full((B, heads, k), float("-inf"))
        best_ids = torch.full((B, heads, k), -1, dtype=torch.int64, device=self.device)
        step = max(k, self.chunk_rows // (B * heads))
        # flat store row of (b, row) is b * C + row: index_select on the flat store gathers ~4x faster than [b, row]
        base = (torch.arange(B, device=self.device) * self._store.shape[1]).view(B, 1, 1)
        flat_store = self._store.view(-1, self.word_size)
        for first in range(0, candidates, step):
            index = torch.arange(first, min(first + step, candidates), device=self.device).repeat(B, heads, 1)
            probe = torch.searchsorted(ends, index, right=True)
            valid = probe < probes
            position = (index + shift.gather(-1, probe.clamp(max=probes - 1))).masked_fill(~valid, 0)
            rows = self._order.gather(1, position.flatten(1)).view_as(position)
            ids = self._entry_ids.gather(1, rows.flatten(1)).view_as(rows).masked_fill(~valid, -1)
            vectors = flat_store.index_select(0, (rows + base).flatten()).view(*rows.shape, self.word_size)
            scores = torch.einsum("brcw,brw->brc", vectors, unit)
            scores = scores.masked_fill(ids < 0, float("-inf"))  # tombstones and past-the-lists padding
            top_scores, top = scores.topk(min(k, scores.shape[-1]), dim=-1)
            best_scores, order = torch.cat([best_scores, top_scores], -1).topk(k, dim=-1)
            best_ids = torch.cat([best_ids, ids.gather(-1, top)], -1).gather(-1, order)
        return best_scores, best_ids.masked_fill(best_scores == float("-inf"), -1)

    # ----- bookkeeping

    def _reset_row(self, b: int) -> None:
        written = torch.cat([self._entry_ids[b, : self._entries[b]], self._buffer.row(b)[1]])
        self._slot[b, written[written >= 0]] = -1
        self._entry_ids[b] = -1
        self._entries[b] = self._dead[b] = self._trained[b] = self._fresh[b] = 0
        self._buffer.clear(b)
        # Empty lists for b: its centroids stay until its next merge retrains them (_trained is 0).
        self._offsets[b] = 0
        self._shortest[b] = self._longest[b] = 0
        self._listed_dead[b] = 0
        self._plans.clear()

    def _buffered(self) -> int:
        return self._buffer.total()

    def _tombstones(self) -> int:
        return sum(self._dead)

    def _bytes(self) -> int:
        tensors = [self._store, self._entry_ids, self._entry_list, self._order, self._offsets, self._bias]
        tensors += [] if self._centroids is None else [self._centroids]
        return self._buffer.bytes() + sum(t.numel() * t.element_size() for t in tensors)


def _rank(batch: Tensor, counts: list[int]) -> Tensor:
    """Position of each element of batch (sorted batch-row ids) within its batch row."""
    sizes = torch.tensor(counts, device=batch.device)
    return torch.arange(batch.numel(), device=batch.device) - (sizes.cumsum(0) - sizes)[batch]
