"""FaissIndex: approximate top-K on faiss-cpu (HNSW or IVF-Flat), kept current without per-step rebuilds.

Per batch row, written rows go first to an exact buffer (`buffer_rows` rows, searched
by brute force with torch) and are merged into the faiss index in one batch when it is
full: inserting rows one step at a time would cost ~0.1 ms per row in HNSW.

Stale content is never returned. An overwritten slot moves to the buffer with its new
content, and its old entry leaves the faiss index: IVF-Flat removes it at once (a
hashtable direct map makes remove_ids O(1) per id); HNSW cannot remove (faiss 1.15 has
no remove_ids for IndexHNSWFlat), so the old entry becomes a tombstone, excluded during
the graph search by a bitmap of live entries, and the graph is rebuilt from the live
rows when tombstones pass `rebuild_fraction` of its entries. Vectors are stored
uncompressed as x / ||x||_eps, so the inner products faiss returns for the live
candidates are the exact eps-cosine scores of the current rows (in float32).

Threads: searches run on one OpenMP thread (a step's few queries per batch row gain nothing
from more); SPARSEMEM_THREADS sets faiss's threads for the rest. deterministic=True (or
SPARSEMEM_DETERMINISTIC=1) builds and merges single-threaded, so the graph, and so the
results, are the same on every run (HNSW's level draws and k-means are seeded by faiss).
"""

import contextlib
import math
import os
import time
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from sparsemem.index.base import Index
from sparsemem.index.buffer import WriteBuffer

KINDS = ("hnsw", "ivf")
LOAD_CHUNK = 2**16
"""Rows normalised and added per step of a bulk load (bounds its temporaries to LOAD_CHUNK * W floats)."""
SAMPLE_PER_LIST = 64
"""A bulk load trains IVF k-means on ~64 rows per list (pooled over the batch rows), not on all B * N."""
IMBALANCE_LIMIT = 1.5
"""A bulk-loaded batch row whose rows the pooled lists file with an imbalance factor above this
(nlist * sum(list length^2) / rows^2: the rows a probed list holds on average, against equal lists)
gets lists of its own (batch rows holding unlike words: a row's words would fill a few of the pooled
lists, and every search would scan lists several times as long, many probes landing on empty ones)."""


def load_faiss():
    """Imports faiss-cpu on first use (not a dependency of `import sparsemem`) and applies SPARSEMEM_THREADS."""
    try:
        import faiss
    except ImportError as error:
        raise ImportError(
            "FaissIndex (index='faiss-hnsw' or 'faiss-ivf') needs faiss-cpu: pip install faiss-cpu; "
            "or use index='exact'"
        ) from error
    threads = os.environ.get("SPARSEMEM_THREADS")
    if threads:
        faiss.omp_set_num_threads(int(threads))
    return faiss


class FaissIndex(Index):
    """Approximate top-K cosine search with faiss-cpu HNSW (default) or IVF-Flat, one faiss index per batch row.

    kind="hnsw": IndexHNSWFlat(M=hnsw_m), efConstruction=ef_construction, efSearch=ef_search.
    kind="ivf": IndexIVFFlat with nlist = 4 sqrt(rows) lists (at most rows / 39, faiss's
    minimum for k-means), nprobe lists searched; retrained from the current rows when
    they have grown 4-fold since the last training, so retraining is amortised O(1) per row.
    load(rows [B, N, W]) builds every batch row's index once from all N rows (IVF: one k-means
    on a sample pooled over the batch rows, and one of its own for a row whose words are unlike
    the others', see _load).
    Search runs on the CPU; results come back on the queries' device.
    """

    def __init__(
        self,
        batch_size: int,
        num_slots: int,
        word_size: int,
        *,
        kind: str = "hnsw",
        initial: Tensor | None = None,
        buffer_rows: int = 4096,
        hnsw_m: int = 16,
        ef_construction: int = 40,
        ef_search: int = 64,
        nprobe: int = 16,
        rebuild_fraction: float = 0.25,
        deterministic: bool | None = None,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
        for name, value in (("buffer_rows", buffer_rows), ("hnsw_m", hnsw_m), ("ef_search", ef_search)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if not 0 < rebuild_fraction <= 1:
            raise ValueError(f"rebuild_fraction must be in (0, 1]; got {rebuild_fraction}")
        self.faiss = load_faiss()
        self.kind = kind
        self.buffer_rows = min(buffer_rows, num_slots)
        self.hnsw_m = hnsw_m
        self.ef_construction = ef_construction
        self.ef_search = ef_search
        self.nprobe = nprobe
        self.rebuild_fraction = rebuild_fraction
        if deterministic is None:
            deterministic = os.environ.get("SPARSEMEM_DETERMINISTIC") == "1"
        self.deterministic = deterministic
        super().__init__(batch_size, num_slots, word_size, initial=initial, map_device="cpu")
        # _slot codes: -1 unwritten, >= 0 the faiss label holding the slot, <= -2 buffer row -2 - code.
        self._slots = self._slot.numpy()
        self._buffer = WriteBuffer(self._slot, self.buffer_rows, word_size, torch.float32, "cpu")
        self._ann: list = [None] * batch_size
        # HNSW labels are 0, 1, 2, ... in insertion order: _label_ids maps them to slots and
        # _live is a bitmap (bit l of byte l >> 3) of labels whose slot still holds that row.
        # IVF labels are the slots themselves.
        self._label_ids = [np.empty(0, dtype=np.int64) for _ in range(batch_size)]
        self._live = [np.empty(0, dtype=np.uint8) for _ in range(batch_size)]
        self._dead = [0] * batch_size
        self._trained_rows = [0] * batch_size

    # ----- writes

    def _update(self, batch: Tensor, slots: Tensor, unit: Tensor) -> None:
        # One pass over all batch rows' pairs (sorted by batch row, then slot), in numpy on views of
        # the map and the buffer (a step writes ~J rows per batch row: each torch op would cost more
        # than the work): per batch row only the faiss calls (remove_ids, a merge when a buffer fills).
        batch, slots = batch.cpu().numpy(), slots.cpu().numpy()
        unit = unit.detach().float().cpu().numpy()
        buffer = self._buffer
        codes = self._slots[batch, slots]
        buffered = codes <= -2  # still in the exact buffer: overwritten there
        if buffered.any():
            buffer.rows.numpy()[batch[buffered], -2 - codes[buffered]] = unit[buffered]
            appended = ~buffered
            batch, slots, unit, codes = batch[appended], slots[appended], unit[appended], codes[appended]
        indexed = codes >= 0  # in faiss: the old entry leaves it now
        if indexed.any():
            self._drop(batch[indexed], codes[indexed])
            self._slots[batch[indexed], slots[indexed]] = -1  # until the buffer takes them below
        fresh = np.bincount(batch[codes == -1], minlength=self.batch_size).tolist()
        self._rows = [rows + count for rows, count in zip(self._rows, fresh, strict=True)]
        if not len(batch):
            return
        counts = np.bincount(batch, minlength=self.batch_size)
        starts = np.asarray(buffer.held)
        fits = starts + counts < self.buffer_rows  # no merge: straight into the buffer
        into = fits[batch]
        first_pair = np.cumsum(counts) - counts
        positions = starts[batch] + np.arange(len(batch)) - first_pair[batch]
        rows_in, positions_in, slots_in = batch[into], positions[into], slots[into]
        buffer.rows.numpy()[rows_in, positions_in] = unit[into]
        buffer.slots.numpy()[rows_in, positions_in] = slots_in
        self._slots[rows_in, slots_in] = -2 - positions_in
        added = np.where(fits, counts, 0)
        buffer.held = (starts + added).tolist()
        buffer.counts.numpy()[:] += added
        for b in np.flatnonzero(~fits).tolist():
            mine = batch == b
            self._append_row(b, slots[mine], torch.from_numpy(unit[mine]))

    def _append_row(self, b: int, slots: np.ndarray, unit: Tensor) -> None:
        """Rows of slots not in the buffer into batch row b's buffer, merging it into faiss whenever it fills."""
        if len(slots) >= self.buffer_rows:
            # A bulk write (a preloaded memory): into faiss at once, with what the buffer holds.
            held_unit, held_slots = self._buffer.row(b)
            vectors = np.concatenate([held_unit.numpy(), unit.numpy()])
            slots = np.concatenate([held_slots.numpy(), slots])
            self._buffer.clear(b)
            self._merge(b, vectors, slots)
            return
        while len(slots):
            start = self._buffer.held[b]
            take = min(len(slots), self.buffer_rows - start)
            batch = torch.full((take,), b, dtype=torch.int64)
            self._buffer.put(batch, torch.arange(start, start + take), torch.from_numpy(slots[:take]), unit[:take])
            self._buffer.grow([take if row == b else 0 for row in range(self.batch_size)])
            slots, unit = slots[take:], unit[take:]
            if self._buffer.held[b] == self.buffer_rows:
                held_unit, held_slots = self._buffer.row(b)
                self._merge(b, held_unit.numpy(), held_slots.numpy().copy())
                self._buffer.clear(b)

    def _load(self, rows: Tensor) -> None:
        """All N slots of every batch row at once (a preloaded memory): one build per batch row,
        with no buffer, merges or retraining on the way. IVF trains its lists once, on a sample
        of ~SAMPLE_PER_LIST rows per list pooled over the batch rows, so the B indexes share one
        set of centroids (k-means on B * N rows, or B times on N, would cost minutes at a
        million slots), unless a batch row's words fill them unevenly (IMBALANCE_LIMIT): that
        row trains its own; every row is then assigned, the lists are sized to their final length
        and the rows added with those assignments, so no list grows by reallocation. HNSW adds
        the rows chunk by chunk. Rows are normalised a chunk at a time: nothing of size N * W
        is made besides what faiss stores."""
        start = time.perf_counter()
        num_slots = self.num_slots
        slots = np.arange(num_slots, dtype=np.int64)
        with self._build_threads():
            template = self._trained_ivf(rows) if self.kind == "ivf" else None
            for b in range(self.batch_size):
                if self.kind == "ivf":
                    self._load_ivf(b, rows[b], template)
                else:
                    ann = self.faiss.IndexHNSWFlat(self.word_size, self.hnsw_m, self.faiss.METRIC_INNER_PRODUCT)
                    ann.hnsw.efConstruction = self.ef_construction
                    for _, unit in self._unit_chunks(rows[b]):
                        ann.add(unit)
                    self._ann[b] = ann
                    self._label_ids[b] = slots.copy()
                    self._live[b] = np.packbits(np.ones(num_slots, np.uint8), bitorder="little")
                self._slots[b] = slots
                self._rows[b] = num_slots
                self._cursor[b] = num_slots
        self._rebuilds += self.batch_size
        self._build_seconds += time.perf_counter() - start

    def _unit_chunks(self, rows: Tensor) -> Iterator[tuple[int, np.ndarray]]:
        """(first slot, unit rows float32 [chunk, W]) over rows [N, W], LOAD_CHUNK slots at a time."""
        for first in range(0, rows.shape[0], LOAD_CHUNK):
            unit = self._stored(rows[first : first + LOAD_CHUNK]).float().cpu().contiguous()
            yield first, unit.numpy()

    def _ivf_lists(self, rows: int) -> int:
        """IVF lists for `rows` indexed rows: 4 sqrt(rows), at most rows / 39 (faiss's minimum for k-means)."""
        return max(1, min(round(4 * math.sqrt(rows)), rows // 39))

    def _trained_ivf(self, rows: Tensor):
        """An empty IndexIVFFlat for N rows per batch row, trained on a sample pooled over rows [B', N, W]."""
        faiss, num_slots = self.faiss, self.num_slots
        lists = self._ivf_lists(num_slots)
        total = rows.shape[0] * num_slots
        count = min(total, SAMPLE_PER_LIST * lists)
        # Sorted positions read the memory in order; the draw is seeded, so builds repeat.
        generator = torch.Generator().manual_seed(1234)
        picks = torch.randperm(total, generator=generator)[:count].sort().values.to(rows.device)
        sample = self._stored(rows[picks // num_slots, picks % num_slots]).float().cpu().contiguous().numpy()
        quantizer = faiss.IndexFlatIP(self.word_size)
        ann = faiss.IndexIVFFlat(quantizer, self.word_size, lists, faiss.METRIC_INNER_PRODUCT)
        ann.cp.seed = 1234
        ann.cp.min_points_per_centroid = 1
        ann.train(sample)
        return ann

    def _load_ivf(self, b: int, rows: Tensor, template) -> None:
        """Batch row b's IVF from rows [N, W]: assign every row, size each list, add with the
        assignments; lists trained on rows alone if the template's file them unevenly."""
        faiss = self.faiss
        assigned, lengths = self._assigned(template, rows)
        if template.nlist * np.square(lengths, dtype=np.float64).sum() > IMBALANCE_LIMIT * self.num_slots**2:
            template = self._trained_ivf(rows.unsqueeze(0))
            assigned, lengths = self._assigned(template, rows)
        ann = faiss.clone_index(template)
        ann.set_direct_map_type(faiss.DirectMap.Hashtable)
        lists = ann.invlists
        for number, length in enumerate(lengths.tolist()):
            # std::vector keeps its capacity when shrunk: the list is allocated once, at its final size.
            lists.resize(number, length)
            lists.resize(number, 0)
        for first, unit in self._unit_chunks(rows):
            ids = np.arange(first, first + len(unit), dtype=np.int64)
            codes = assigned[first : first + len(unit)]
            ann.add_core(len(unit), faiss.swig_ptr(unit), faiss.swig_ptr(ids), faiss.swig_ptr(codes))
        self._ann[b] = ann
        self._trained_rows[b] = self.num_slots

    def _assigned(self, template, rows: Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(assigned [N]: the list template's centroids file each of rows [N, W] under, lengths [nlist])."""
        assigned = np.empty(self.num_slots, dtype=np.int64)
        for first, unit in self._unit_chunks(rows):
            assigned[first : first + len(unit)] = template.quantizer.assign(unit, 1).ravel()
        return assigned, np.bincount(assigned, minlength=template.nlist)

    def _forget(self, batch: Tensor, slots: Tensor) -> None:
        batch, slots = batch.numpy(), slots.numpy()
        codes = self._slots[batch, slots]
        indexed, buffered = codes >= 0, codes <= -2
        self._drop(batch[indexed], codes[indexed])
        self._buffer.remove(torch.from_numpy(batch[buffered]), torch.from_numpy(codes[buffered]))
        self._slots[batch, slots] = -1

    def _drop(self, batch: np.ndarray, labels: np.ndarray) -> None:
        """Faiss entries `labels` of batch rows `batch` leave the index (their slots were overwritten or
        forgotten): IVF removes them; HNSW marks them dead, tombstones that count toward a rebuild at a merge."""
        for b in np.unique(batch).tolist():
            mine = labels[batch == b]
            if self.kind == "ivf":
                self._ann[b].remove_ids(self.faiss.IDSelectorArray(mine))
                continue
            np.bitwise_and.at(self._live[b], mine >> 3, ~(1 << (mine & 7)).astype(np.uint8))
            self._dead[b] += len(mine)

    def _merge(self, b: int, vectors: np.ndarray, slots: np.ndarray) -> None:
        """Put unit rows `vectors` of `slots` into batch row b's faiss index (building it if there is none)."""
        ann = self._ann[b]
        if ann is None or (self.kind == "ivf" and ann.ntotal + len(slots) >= 4 * self._trained_rows[b]):
            self._build(b, vectors, slots)
        else:
            start = time.perf_counter()
            with self._build_threads():
                self._add(b, vectors, slots)
            self._timed_merge(start)
        if self.kind == "hnsw" and self._dead[b] > self.rebuild_fraction * self._ann[b].ntotal:
            self._build(b)

    def _add(self, b: int, vectors: np.ndarray, slots: np.ndarray) -> None:
        ann = self._ann[b]
        if self.kind == "ivf":
            ann.add_with_ids(vectors, slots)
            self._slots[b, slots] = slots
            return
        first = ann.ntotal
        ann.add(vectors)
        self._label_ids[b] = np.concatenate([self._label_ids[b], slots])
        live = np.unpackbits(self._live[b], count=first, bitorder="little")
        self._live[b] = np.packbits(np.concatenate([live, np.ones(len(slots), np.uint8)]), bitorder="little")
        self._slots[b, slots] = np.arange(first, ann.ntotal)

    def _build(self, b: int, vectors: np.ndarray | None = None, slots: np.ndarray | None = None) -> None:
        """A new faiss index for batch row b from its live indexed rows plus `vectors` at `slots`."""
        start = time.perf_counter()
        live_slots, live_vectors = self._indexed(b)
        if vectors is not None:
            live_slots = np.concatenate([live_slots, slots])
            live_vectors = np.concatenate([live_vectors, vectors])
        faiss = self.faiss
        with self._build_threads():
            if self.kind == "hnsw":
                ann = faiss.IndexHNSWFlat(self.word_size, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
                ann.hnsw.efConstruction = self.ef_construction
            else:
                rows = len(live_slots)
                lists = self._ivf_lists(rows)
                quantizer = faiss.IndexFlatIP(self.word_size)
                ann = faiss.IndexIVFFlat(quantizer, self.word_size, lists, faiss.METRIC_INNER_PRODUCT)
                ann.cp.seed = 1234
                ann.cp.min_points_per_centroid = 1  # lists <= rows / 39 already; quiet below 39 rows
                ann.train(live_vectors)
                ann.set_direct_map_type(faiss.DirectMap.Hashtable)
                self._trained_rows[b] = rows
            self._ann[b] = ann
            self._label_ids[b] = np.empty(0, dtype=np.int64)
            self._live[b] = np.empty(0, dtype=np.uint8)
            self._dead[b] = 0
            self._add(b, live_vectors, live_slots)
        self._timed_build(start)

    def _indexed(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(slots, vectors) of the live entries of batch row b's faiss index."""
        ann = self._ann[b]
        if ann is None or ann.ntotal == 0:
            return np.empty(0, dtype=np.int64), np.empty((0, self.word_size), dtype=np.float32)
        if self.kind == "ivf":
            slots = np.flatnonzero(self._slots[b] >= 0)
            return slots, ann.reconstruct_batch(slots)
        labels = np.flatnonzero(np.unpackbits(self._live[b], bitorder="little")[: ann.ntotal])
        return self._label_ids[b][labels], ann.reconstruct_batch(labels)

    @contextlib.contextmanager
    def _build_threads(self) -> Iterator[None]:
        with self._one_thread(self.deterministic):
            yield

    @contextlib.contextmanager
    def _one_thread(self, when: bool = True) -> Iterator[None]:
        """faiss on one OpenMP thread inside the block (when `when`), its setting restored after."""
        if not when:
            yield
            return
        threads = self.faiss.omp_get_max_threads()
        self.faiss.omp_set_num_threads(1)
        try:
            yield
        finally:
            self.faiss.omp_set_num_threads(threads)

    def rebuild(self) -> None:
        """Merge every buffer and rebuild each faiss index from its live rows (drops tombstones, retrains IVF)."""
        for b in range(self.batch_size):
            if self._ann[b] is None and self._buffer.held[b] == 0:
                continue
            held_unit, held_slots = self._buffer.row(b)
            self._build(b, held_unit.numpy(), held_slots.numpy().copy())
            self._buffer.clear(b)

    # ----- search

    def _search(self, unit: Tensor, k: int) -> tuple[Tensor, Tensor]:
        unit = unit.float().cpu()
        scores, ids = self._buffer_search(unit, k)
        searched = [b for b, ann in enumerate(self._ann) if ann is not None and ann.ntotal > self._dead[b]]
        if not searched:  # everything written is still in the buffer (a fresh memory below buffer_rows)
            return scores, ids
        ann_scores = torch.full_like(scores, float("-inf"))
        ann_ids = torch.full_like(ids, -1)
        # One thread: a batch row's R queries are too few to split, and each OpenMP fork-join
        # waits for every worker; on a busy machine one that is not scheduled stalls the search
        # for a scheduler tick.
        with self._one_thread():
            for b in searched:
                ann_scores[b], ann_ids[b] = self._search_ann(b, unit[b].numpy(), k)
        merged, order = torch.cat([scores, ann_scores], -1).topk(k, dim=-1)
        return merged, torch.cat([ids, ann_ids], -1).gather(-1, order)

    def _buffer_search(self, unit: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """WriteBuffer.search on the host, its masking and padding in numpy: (scores, slots) [B, R, K]."""
        buffer = self._buffer
        held = buffer.held
        filled = max(held)
        batch_size, heads = unit.shape[:2]
        scores = np.full((batch_size, heads, k), -np.inf, dtype=np.float32)
        ids = np.full((batch_size, heads, k), -1, dtype=np.int64)
        if filled:
            all_scores = torch.bmm(unit, buffer.rows[:, :filled].transpose(1, 2))
            view = all_scores.numpy()
            for b, count in enumerate(held):
                view[b, :, count:] = -np.inf
            top_scores, rows = all_scores.topk(min(k, filled), dim=-1)
            top_scores, rows = top_scores.numpy(), rows.numpy()
            slots = buffer.slots.numpy()
            top_ids = slots[np.arange(batch_size).reshape(-1, 1, 1), rows]
            top_ids[top_scores == -np.inf] = -1
            width = rows.shape[-1]
            scores[..., :width], ids[..., :width] = top_scores, top_ids
        return torch.from_numpy(scores), torch.from_numpy(ids)

    def _search_ann(self, b: int, queries: np.ndarray, k: int) -> tuple[Tensor, Tensor]:
        ann = self._ann[b]
        count = min(k, ann.ntotal - self._dead[b])
        effort = self.ef_search if self.kind == "hnsw" else self.nprobe
        while True:
            scores, labels = ann.search(queries, count, params=self._search_params(b, effort))
            found = (labels >= 0).all()
            # Too few live entries reached (many tombstones near the queries, or short
            # IVF lists): search again, wider, until K are found or everything was searched.
            if found or effort >= self._effort_limit(b):
                break
            effort *= 2
        if found:
            ids = self._label_ids[b][labels] if self.kind == "hnsw" else labels
            scores, ids = torch.from_numpy(scores), torch.from_numpy(ids)
        else:
            # Some live entries are unreachable even by a full-width search (an inner-product
            # graph need not be connected): a brute-force pass, only ever when K nears the row count.
            slots, vectors = self._indexed(b)
            scores, rows = (torch.from_numpy(queries) @ torch.from_numpy(vectors).T).topk(count, dim=-1)
            ids = torch.from_numpy(slots)[rows]
        padded_scores = torch.full((queries.shape[0], k), float("-inf"))
        padded_ids = torch.full((queries.shape[0], k), -1, dtype=torch.int64)
        padded_scores[:, :count], padded_ids[:, :count] = scores, ids
        return padded_scores, padded_ids

    def _search_params(self, b: int, effort: int):
        if self.kind == "ivf":
            return self.faiss.SearchParametersIVF(nprobe=effort)
        if self._dead[b] == 0:
            return self.faiss.SearchParametersHNSW(efSearch=effort)
        live = self._live[b]
        selector = self.faiss.IDSelectorBitmap(self._ann[b].ntotal, self.faiss.swig_ptr(live))
        params = self.faiss.SearchParametersHNSW(sel=selector, efSearch=effort)
        params.keep_alive = (live, selector)  # the bitmap must outlive the search
        return params

    def _effort_limit(self, b: int) -> int:
        return self._ann[b].ntotal if self.kind == "hnsw" else self._ann[b].nlist

    # ----- bookkeeping

    def _reset_row(self, b: int) -> None:
        self._slot[b].fill_(-1)
        self._ann[b] = None
        self._buffer.clear(b)
        self._label_ids[b] = np.empty(0, dtype=np.int64)
        self._live[b] = np.empty(0, dtype=np.uint8)
        self._dead[b] = 0
        self._trained_rows[b] = 0

    def _buffered(self) -> int:
        return self._buffer.total()

    def _tombstones(self) -> int:
        return sum(self._dead)

    def _bytes(self) -> int:
        total = self._buffer.bytes()
        for b, ann in enumerate(self._ann):
            if ann is None:
                continue
            total += ann.ntotal * self.word_size * 4
            if self.kind == "hnsw":
                graph = ann.hnsw
                total += graph.neighbors.size() * 4 + graph.offsets.size() * 8 + graph.levels.size() * 4
                total += self._label_ids[b].nbytes + self._live[b].nbytes
            else:
                # ids in the lists, the coarse centroids, and ~32 bytes per hashtable entry (an estimate)
                total += ann.ntotal * (8 + 32) + ann.nlist * self.word_size * 4
        return total
