"""SDNCMemory: SAM's sparse memory plus DNC temporal links kept sparse (Rae et al. 2016).

reference/sdnc.py is the dense specification: one link matrix L whose rows and columns keep
K_L entries each (the mutual top-K_L cut), so the backward link matrix is exactly L^T. Here
L is stored twice, by slot, in a LinkStore: the forward store holds row s of L, the backward
store row s of L^T, each as K_L (int32 index, value) pairs, written in place through the
journal of memory/journal.py like the memory rows. A step
  - finds the rows the update can change through the transposes (the written slots W, the
    forward rows at the entries of the backward rows of W and of the precedence slots P,
    the backward rows at W, P and the entries of the forward rows of W): at most
    J + (J + K_L) K_L and J + K_L + J K_L rows, a fixed width on the GPU (no host sync),
    the rows really touched on the CPU;
  - gathers them, runs sparsemem.ops.sparse_link_update, scatters the results back;
  - gathers the rows of both stores at the R*3K read slots of t-1 and runs
    sparsemem.ops.sparse_temporal_reads (f from backward rows, b from forward rows).
So the work and the memory autograd keeps per step are O(J K_L^2 + R K K_L), whatever N and
however many slots were written before. Forward and backward reads, cut to their top K,
join the content read's K slots: a read head's weighting has 3K entries.
"""

import weakref
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from sparsemem import _checks, ops
from sparsemem._malloc import huge_pages
from sparsemem._profiling import region
from sparsemem.memory.journal import JournaledMemory
from sparsemem.memory.row_store import LazyRows
from sparsemem.memory.sam import SAMInterface, SAMMemory, SAMState, SparseWeights, kept
from sparsemem.memory.versions import Timeline


class LinkStore(LazyRows):
    """The forward and backward link rows of B batch rows, addressed by slot, K_L pairs per row.

    LazyRows with 2N "slots" per batch row and values of K_L: id s < N is row s of L, id N + s
    row s of L^T; id -1 (padding) maps to one spare row that is never marked written, so it
    reads as empty whatever is written to it. Values and int32 indices live in flat buffers
    from torch.empty: only the pages of touched rows ever take memory, and a reset clears the
    rows written since, in O(rows written).
    """

    def __init__(self, batch: int, num_slots: int, link_k: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(batch, 2 * num_slots, torch.zeros(link_k, dtype=dtype, device=device), spare_rows=1)
        self.spare = batch * self.num_slots
        self.indices = huge_pages(torch.empty(self.spare + 1, link_k, dtype=torch.int32, device=device))

    def _empty_like(self) -> "LinkStore":
        return LinkStore(self.batch, self.num_slots // 2, self.word_size, self.rows.dtype, self.rows.device)

    def copy(self, timeline: Timeline) -> "LinkStore":
        copy = super().copy(timeline)
        copy.indices.copy_(self.indices)  # only written rows' indices are ever read
        return copy

    def row_ids(self, ids: Tensor) -> Tensor:
        """ids [B, ...] in [-1, 2N) -> row ids [B * ...] (-1: the spare row)."""
        if self.on_host:  # in numpy: a step asks for several small sets of ids
            slots = ids.numpy()
            offsets = (np.arange(self.batch) * self.num_slots).reshape(-1, *([1] * (slots.ndim - 1)))
            return torch.from_numpy(np.where(slots >= 0, slots + offsets, self.spare).reshape(-1))
        offsets = torch.arange(self.batch, device=ids.device) * self.num_slots
        row_ids = ids + offsets.view(-1, *([1] * (ids.dim() - 1)))
        return torch.where(ids >= 0, row_ids, self.spare).reshape(-1)

    def read_indices(self, row_ids: Tensor) -> Tensor:
        """row_ids [M] -> int64 indices [M, K_L] (-1 where never written)."""
        if self.on_host:
            rows = row_ids.numpy()
            written = self.written.numpy()[rows][:, None]
            return torch.from_numpy(np.where(written, self.indices.numpy()[rows], -1).astype(np.int64))
        return torch.where(self.written[row_ids].unsqueeze(-1), self.indices[row_ids].long(), -1)

    def write_indices(self, row_ids: Tensor, indices: Tensor) -> None:
        """The indices [M, K_L] of the rows at row_ids [M] (write sets their values)."""
        indices = indices.to(torch.int32)
        self._record(lambda: _Reindex(self, row_ids, indices))
        if self.on_host:
            self.indices.numpy()[row_ids.numpy()] = indices.numpy()
            return
        self.indices[row_ids] = indices


class _Reindex:
    """Link rows' indices set at row_ids [M]: undo puts back the ones they replaced (their values
    are the LazyRows write beside it, which counts the rows)."""

    rows = 0

    def __init__(self, store: LinkStore, row_ids: Tensor, indices: Tensor) -> None:
        self.store, self.row_ids, self.new = weakref.proxy(store), row_ids, indices  # versions.py: no cycle
        self.old = store.indices.index_select(0, row_ids)

    def undo(self) -> None:
        self.store.indices[self.row_ids] = self.old

    def redo(self) -> None:
        self.store.indices[self.row_ids] = self.new


@dataclass
class SparseLinks:
    """rows: the LinkStore (forward and backward rows) as one journaled segment;
    precedence_indices, precedence_values [B, K_L]: p's K_L (slot, value) pairs (-1: none)."""

    rows: JournaledMemory
    precedence_indices: Tensor
    precedence_values: Tensor

    @property
    def store(self) -> LinkStore:
        return self.rows.store

    def ids(self, slots: Tensor, backward: bool) -> Tensor:
        """Store ids of the forward (backward) rows at slots [B, ...] (-1 stays -1)."""
        if self.store.on_host:
            values = slots.numpy()
            return torch.from_numpy(np.where(values >= 0, values + backward * (self.store.num_slots // 2), -1))
        return torch.where(slots >= 0, slots + backward * (self.store.num_slots // 2), -1)

    def indices(self, slots: Tensor, backward: bool) -> Tensor:
        """The stored entries' slots of the rows at slots [B, S] -> [B, S * K_L] (no gradient)."""
        return self.store.read_indices(self.store.row_ids(self.ids(slots, backward))).view(slots.shape[0], -1)

    def gather(self, ids: Tensor, row_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """ids [B, Q] -> (indices [B, Q, K_L], values [B, Q, K_L]); values are journaled.
        row_ids: the store's row ids of ids, if known (they serve gather and scatter alike)."""
        row_ids = self.store.row_ids(ids) if row_ids is None else row_ids
        indices = self.store.read_indices(row_ids).view(*ids.shape, -1)
        return indices, self.rows.gather(ids, row_ids)

    def scatter(self, ids: Tensor, indices: Tensor, values: Tensor, row_ids: Tensor | None = None) -> None:
        """Rows [B, Q, K_L] into ids [B, Q] (distinct, or -1: dropped) in place."""
        row_ids = self.store.row_ids(ids) if row_ids is None else row_ids
        self.rows.scatter(ids, values, ids >= 0, row_ids)
        self.store.write_indices(row_ids, indices.reshape(-1, indices.shape[-1]))

    def detach(self) -> "SparseLinks":
        return SparseLinks(self.rows.detached(), self.precedence_indices, self.precedence_values.detach())

    def reset(self, mask: Tensor) -> "SparseLinks":
        self.rows.reset(mask)
        rows = mask.view(-1, 1)
        return SparseLinks(
            self.rows, self.precedence_indices.masked_fill(rows, -1), self.precedence_values.masked_fill(rows, 0)
        )

    def dense(self, num_slots: int) -> tuple[Tensor, Tensor, Tensor]:
        """(link [B, N, N], backward_link [B, N, N], precedence [B, N]) (O(N^2): for tests only)."""
        batch = self.precedence_indices.shape[0]
        slots = torch.arange(num_slots, device=self.precedence_indices.device).expand(batch, -1)

        def matrix(backward: bool) -> Tensor:
            with torch.no_grad():  # a look at the store, not a step of the segment
                indices, values = self.gather(self.ids(slots, backward))
            dense = values.new_zeros(batch, num_slots, num_slots + 1)  # index -1 lands in the extra column
            return dense.scatter_add(-1, indices % (num_slots + 1), values)[..., :num_slots]

        precedence = self.precedence_values.new_zeros(batch, num_slots + 1)
        precedence = precedence.scatter_add(-1, self.precedence_indices % (num_slots + 1), self.precedence_values)
        return matrix(False), matrix(True), precedence[:, :num_slots]


def _packed(slots: Tensor) -> Tensor:
    """Each slot >= 0 of slots [B, S] once, ascending, then -1s.

    On the CPU the columns past the fullest batch row are cut: reading the count costs nothing
    there, and the rows really touched are few (about 60 of the ~900 places of the fixed width
    at B = 8, R = 4, K = 8, K_L = 8), so the update's work and what autograd keeps shrink ~15x.
    On the GPU the width stays fixed, so the step never waits for the device.
    """
    last = torch.iinfo(slots.dtype).max
    if _checks.on_host(slots.device):
        # in numpy (a vectorised sort of [8, ~900] int64 in 22 us, torch.sort 190 us, one thread),
        # each batch row's kept slots moved to its first columns
        values = slots.numpy()
        values = np.sort(np.where(values < 0, last, values), axis=-1)
        keep = values != last
        keep[:, 1:] &= values[:, 1:] != values[:, :-1]
        counts = keep.sum(-1)
        packed = np.full((values.shape[0], max(1, int(counts.max()))), -1, dtype=values.dtype)
        packed[np.repeat(np.arange(values.shape[0]), counts), (np.cumsum(keep, -1) - 1)[keep]] = values[keep]
        return torch.from_numpy(packed)
    slots = torch.where(slots < 0, last, slots).sort(dim=-1).values
    keep = slots != last
    keep[:, 1:] &= slots[:, 1:] != slots[:, :-1]
    width = slots.shape[1]
    # each kept slot to its rank among the kept ones; the rest to a spare column, cut after
    places = torch.where(keep, keep.cumsum(-1) - 1, width)
    packed = torch.full((slots.shape[0], width + 1), -1, dtype=slots.dtype, device=slots.device)
    return packed.scatter_(1, places, torch.where(keep, slots, -1))[:, :width]


def sparse_link_update(links: SparseLinks, write_w: SparseWeights) -> SparseLinks:
    """L_t and p_t from w^W_t: gathers the rows the update can change (sparse_link_update's
    contract, found through the transposes), updates them, writes them back in place."""
    # each written slot once (J entries hold ~R K / 2 distinct slots): the rows looked up through
    # the transposes, and the slots sorted below, shrink to what the update can change
    written, precedence = _packed(write_w.indices), links.precedence_indices
    forward_slots = _packed(torch.cat([written, links.indices(torch.cat([written, precedence], -1), True)], -1))
    backward_slots = _packed(torch.cat([written, precedence, links.indices(written, False)], -1))
    ids = torch.cat([links.ids(forward_slots, False), links.ids(backward_slots, True)], -1)
    row_ids = links.store.row_ids(ids)  # once, for the gather and the scatter back
    indices, values = links.gather(ids, row_ids)
    rows = forward_slots.shape[1]
    new = ops.sparse_link_update(
        forward_slots,
        indices[:, :rows],
        values[:, :rows],
        backward_slots,
        indices[:, rows:],
        values[:, rows:],
        links.precedence_indices,
        links.precedence_values,
        write_w.indices,
        write_w.weights,
    )
    links.scatter(ids, torch.cat([new[1], new[3]], 1), torch.cat([new[0], new[2]], 1), row_ids)
    return replace(links, precedence_indices=new[5], precedence_values=new[4])


def sparse_temporal_reads(links: SparseLinks, read_w: SparseWeights, k: int) -> tuple[SparseWeights, SparseWeights]:
    """f = L w^R and b = L^T w^R through the rows at the read slots, each cut to its top K per head.

    read_w: indices, weights [B, R, Q] -> (forward, backward) with indices, weights [B, R, K]
    (empty places: slot 0, weight 0).
    """
    batch, heads, reads = read_w.indices.shape
    ids = torch.cat([links.ids(read_w.indices, False), links.ids(read_w.indices, True)], -1)
    indices, values = links.gather(ids.view(batch, -1))
    shape = (batch, heads, 2, reads, -1)
    indices, values = indices.view(shape), values.view(shape)
    out = ops.sparse_temporal_reads(
        read_w.weights, indices[:, :, 0], values[:, :, 0], indices[:, :, 1], values[:, :, 1], k
    )
    return SparseWeights(out[1].clamp(min=0), out[0]), SparseWeights(out[3].clamp(min=0), out[2])


@dataclass
class SDNCInterface(SAMInterface):
    """SAM's interface plus read_modes [B, R, 3]: (backward, content, forward), rows sum to 1."""

    read_modes: Tensor = None


@dataclass
class SDNCState(SAMState):
    """SAMState plus the sparse links; read_weights hold 3K entries per head."""

    links: SparseLinks = None

    def advanced(self) -> "SDNCState":
        state = super().advanced()
        return replace(state, links=replace(self.links, rows=self.links.rows.advance()))

    def detach(self) -> "SDNCState":
        return replace(super().detach(), links=self.links.detach())

    def clone(self) -> "SDNCState":
        state = super().clone()
        rows = JournaledMemory(self.links.store.copy(state.timeline))
        return replace(state, links=replace(self.links.detach(), rows=rows))

    def reset(self, mask: Tensor) -> "SDNCState":
        state = super().reset(mask)
        return replace(state, links=state.links.reset(mask))


class SDNCMemory(SAMMemory):
    """Sparse DNC: SAM's memory, LRU and writes, plus sparse temporal links with K_L entries per row.

    Interface per step [B, R*W + R + W + 2 + 3R]: SAM's, then read modes (softmax over 3 per head).
    """

    state_type = SDNCState
    read_width = 3

    def __init__(
        self, num_slots: int, word_size: int, num_reads: int, k: int = 8, index: str = "exact", link_k: int = 8
    ) -> None:
        super().__init__(num_slots, word_size, num_reads, k, index)
        if not isinstance(link_k, int) or not 1 <= link_k <= num_slots:
            raise ValueError(f"link_k must be in [1, N={num_slots}]; got link_k={link_k}")
        self.link_k = link_k

    @property
    def interface_size(self) -> int:
        return super().interface_size + 3 * self.num_reads

    def state_sizes(self) -> dict[str, int]:
        return {**super().state_sizes(), "K_L": self.link_k}

    def sizes_of(self, state: SDNCState) -> dict[str, int]:
        return {**super().sizes_of(state), "K_L": state.links.store.word_size}

    def split_interface(self, interface: Tensor) -> SDNCInterface:
        sam_part, modes = interface.split([super().interface_size, 3 * self.num_reads], dim=-1)
        parts = super().split_interface(sam_part)
        modes = torch.softmax(modes.view(-1, self.num_reads, 3), dim=-1)
        return SDNCInterface(parts.keys, parts.strengths, parts.add, parts.write_gate, parts.interp_gate, modes)

    def init_state(
        self,
        batch: int,
        memory: Tensor | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> SDNCState:
        sam = super().init_state(batch, memory, device, dtype)
        dtype, device = sam.read_weights.weights.dtype, sam.read_weights.weights.device
        heads, width = self.num_reads, 3 * self.k
        reads = SparseWeights(
            torch.zeros(batch, heads, width, dtype=torch.int64, device=device),
            torch.zeros(batch, heads, width, dtype=dtype, device=device),
        )
        link_store = LinkStore(batch, self.num_slots, self.link_k, dtype, device)
        link_store.timeline = sam.timeline  # one timeline: a state names a version of both stores
        links = SparseLinks(
            JournaledMemory(link_store),
            torch.full((batch, self.link_k), -1, dtype=torch.int64, device=device),
            torch.zeros(batch, self.link_k, dtype=dtype, device=device),
        )
        return SDNCState(**{**vars(sam), "read_weights": reads, "links": links})

    def step(
        self, state: SDNCState, interface: Tensor | SDNCInterface, active: Tensor | None = None
    ) -> tuple[Tensor, SDNCState]:
        """One SDNC step (reference/sdnc.py's order): -> (reads [B, R, W], state)."""
        parts = interface if isinstance(interface, SDNCInterface) else self.split_interface(interface)
        previous, state = state, state.advanced()
        with region("memory.write"):
            write_w = self.write(state, parts.add, parts.write_gate, parts.interp_gate, active)
        with region("memory.links"):
            # a padded row's write weights count as zero: its links and precedence stay as they are
            link_w = write_w if active is None else replace(write_w, weights=write_w.weights * active.unsqueeze(-1))
            links = sparse_link_update(state.links, link_w)
            forward, backward = sparse_temporal_reads(links, state.read_weights, self.k)

        with region("memory.read"):
            batch, heads, k = parts.keys.shape[0], self.num_reads, self.k
            content_slots = state.memory.store.search(parts.keys, k)
            slots = torch.cat([backward.indices, content_slots, forward.indices], dim=-1)  # [B, R, 3K]
            rows = state.memory.gather(slots.reshape(batch, -1))  # [B, R*3K, W]
            # the content part of head r sits at rows r*3K + K ... r*3K + 2K - 1
            content, _ = ops.sparse_read(rows, self.read_places(batch, slots.device), parts.keys, parts.strengths)
            modes = parts.read_modes
            weights = torch.cat(
                [modes[..., :1] * backward.weights, modes[..., 1:2] * content, modes[..., 2:] * forward.weights],
                dim=-1,
            )
            reads = torch.einsum("brq,brqw->brw", weights, rows.view(batch, heads, 3 * k, -1))
            read_w = SparseWeights(slots, weights)
        with region("memory.lru"):
            self.record_access(state, write_w, read_w, active)
        read_w, write_w = kept(read_w, previous.read_weights, active), kept(write_w, previous.write_weights, active)
        return reads, replace(state, read_weights=read_w, write_weights=write_w, links=links, step=state.step + 1)
