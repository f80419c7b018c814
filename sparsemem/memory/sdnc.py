"""SDNCMemory: SAM's sparse memory plus DNC temporal links kept sparse (Rae et al. 2016).

reference/sdnc.py is the dense specification. Here the forward and backward link
matrices are stored separately as rows of K_L (column, value) pairs, one row per slot
ever written (a slot -> row list, growing with touched slots, never N x N); precedence
is K_L (slot, value) pairs. Each step updates every stored row with the DNC rule on
its K_L entries plus the new candidates (precedence for the forward rows, the written
slots for the backward rows) and keeps the K_L largest. Forward and backward reads go
through the rows, are cut to their top K, and join the content read's K slots: a read
head's weighting has 3K entries. All link tensors are functional, so ordinary autograd
differentiates them; their size depends on the slots touched, not on N.
"""

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from sparsemem import ops
from sparsemem._profiling import region
from sparsemem.memory._lazy import group_sum
from sparsemem.memory.sam import SAMInterface, SAMMemory, SAMState, SparseWeights


@dataclass
class SparseLinks:
    """slots [B, S] (-1: padding row); forward/backward_indices [B, S, K_L] (-1: empty) and
    values [B, S, K_L]: row s holds L[slots[s], indices] = values; precedence [B, K_L] pairs."""

    slots: Tensor
    forward_indices: Tensor
    forward_values: Tensor
    backward_indices: Tensor
    backward_values: Tensor
    precedence_indices: Tensor
    precedence_values: Tensor

    def detach(self) -> "SparseLinks":
        return replace(
            self,
            forward_values=self.forward_values.detach(),
            backward_values=self.backward_values.detach(),
            precedence_values=self.precedence_values.detach(),
        )

    def dense(self, num_slots: int) -> tuple[Tensor, Tensor, Tensor]:
        """(link [B, N, N], backward_link [B, N, N], precedence [B, N]) (O(N^2): for tests only)."""
        batch = self.slots.shape[0]
        link = self.forward_values.new_zeros(batch, num_slots + 1, num_slots + 1)
        backward = link.clone()
        rows = (self.slots % (num_slots + 1)).unsqueeze(-1).expand_as(self.forward_indices)
        batches = torch.arange(batch).view(-1, 1, 1).expand_as(rows)
        # row and column -1 land in the extra last row and column, cut off below
        link.index_put_((batches, rows, self.forward_indices % (num_slots + 1)), self.forward_values, accumulate=True)
        backward.index_put_(
            (batches, rows, self.backward_indices % (num_slots + 1)), self.backward_values, accumulate=True
        )
        precedence = self.precedence_values.new_zeros(batch, num_slots + 1)
        precedence.scatter_add_(-1, self.precedence_indices % (num_slots + 1), self.precedence_values)
        return link[:, :num_slots, :num_slots], backward[:, :num_slots, :num_slots], precedence[:, :num_slots]


def _lookup(sorted_keys: Tensor, values: Tensor, queries: Tensor) -> Tensor:
    """values[..., m] where sorted_keys[..., m] == queries[..., q], else 0 (negative queries never match).

    sorted_keys, values [..., M]; queries [..., Q] with the same leading dimensions -> [..., Q].
    Equal keys must carry equal values.
    """
    if sorted_keys.shape[-1] == 0:
        return values.new_zeros(queries.shape)
    queries = queries.contiguous()
    positions = torch.searchsorted(sorted_keys, queries).clamp(max=sorted_keys.shape[-1] - 1)
    hit = (sorted_keys.gather(-1, positions) == queries) & (queries >= 0)
    return values.gather(-1, positions) * hit


def _merge_topk(columns: Tensor, values: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Sum values of equal columns, keep the k largest: [..., C] -> (columns, values) [..., k].

    Values are non-negative (links and precedence are); empty places get column -1, value 0.
    """
    total, first = group_sum(columns, values)
    keep = first & (columns >= 0)
    columns, total = columns.masked_fill(~keep, -1), total.masked_fill(~keep, 0)
    if columns.shape[-1] < k:
        pad = k - columns.shape[-1]
        columns = torch.cat([columns, columns.new_full((*columns.shape[:-1], pad), -1)], dim=-1)
        total = torch.cat([total, total.new_zeros((*total.shape[:-1], pad))], dim=-1)
    top = torch.topk(total, k, dim=-1).indices
    return columns.gather(-1, top), total.gather(-1, top)


def sparse_link_update(links: SparseLinks, write_w: SparseWeights, link_k: int) -> SparseLinks:
    """reference/sdnc.py's sparse_link_update_ref on the stored rows only.

    write_w: the step's J write entries (a slot may repeat; its entries add up).
    """
    total, first = group_sum(write_w.indices, write_w.weights)
    distinct = total * first  # each written slot's weight once
    links = _with_rows_for(links, write_w.indices.masked_fill(~first, -1), link_k)
    written, order = write_w.indices.sort(dim=-1)
    written_w = total.gather(-1, order)
    batch, rows, _ = links.forward_indices.shape
    row_w = _lookup(written, written_w, links.slots).unsqueeze(-1)  # w[i], [B, S, 1]
    on_diagonal_slot = links.slots.unsqueeze(-1)

    def column_w(indices: Tensor) -> Tensor:  # w[j] at each stored entry
        return _lookup(written, written_w, indices.reshape(batch, -1)).view(indices.shape)

    def updated(indices: Tensor, values: Tensor, new_columns: Tensor, new_values: Tensor) -> tuple[Tensor, Tensor]:
        kept = (1 - row_w - column_w(indices)) * values
        columns = torch.cat([indices, new_columns], dim=-1)
        values = torch.cat([kept, new_values], dim=-1).masked_fill(columns == on_diagonal_slot, 0)
        return _merge_topk(columns, values, link_k)

    precedence, order = links.precedence_indices.sort(dim=-1)
    precedence_w = links.precedence_values.gather(-1, order)
    # L[i, j] = (1 - w_i - w_j) L[i, j] + w_i p_j
    forward = updated(
        links.forward_indices,
        links.forward_values,
        links.precedence_indices.unsqueeze(1).expand(-1, rows, -1),
        row_w * links.precedence_values.unsqueeze(1),
    )
    # L_b[i, j] = (1 - w_i - w_j) L_b[i, j] + p_i w_j
    row_p = _lookup(precedence, precedence_w, links.slots).unsqueeze(-1)
    backward = updated(
        links.backward_indices,
        links.backward_values,
        write_w.indices.unsqueeze(1).expand(-1, rows, -1),
        row_p * distinct.unsqueeze(1),
    )
    # p = (1 - sum w) p + w
    new_precedence = _merge_topk(
        torch.cat([links.precedence_indices, write_w.indices], dim=-1),
        torch.cat([(1 - distinct.sum(-1, keepdim=True)) * links.precedence_values, distinct], dim=-1),
        link_k,
    )
    return SparseLinks(links.slots, *forward, *backward, *new_precedence)


def _with_rows_for(links: SparseLinks, slots: Tensor, link_k: int) -> SparseLinks:
    """links with a row for each slot in slots [B, J] (-1 skipped) that has none yet: free rows
    (slot -1: padding, or cleared by a reset; their values are 0) first, then new empty rows."""
    stored = links.slots.sort(dim=-1).values
    new = (slots >= 0) & (_lookup(stored, torch.ones_like(stored), slots) == 0)
    counts = new.sum(-1)
    if not new.any():
        return links
    grow = int((counts - (links.slots < 0).sum(-1)).clamp(min=0).max())
    if grow:
        empty_indices = slots.new_full((slots.shape[0], grow, link_k), -1)
        empty_values = links.forward_values.new_zeros((slots.shape[0], grow, link_k))
        links = replace(
            links,
            slots=torch.cat([links.slots, slots.new_full((slots.shape[0], grow), -1)], dim=1),
            forward_indices=torch.cat([links.forward_indices, empty_indices], dim=1),
            forward_values=torch.cat([links.forward_values, empty_values], dim=1),
            backward_indices=torch.cat([links.backward_indices, empty_indices], dim=1),
            backward_values=torch.cat([links.backward_values, empty_values], dim=1),
        )
    free = links.slots < 0
    # the i-th new slot of a batch row takes its i-th free row (row-major order on both sides)
    target = free & (free.long().cumsum(-1) <= counts.unsqueeze(-1))
    added = slots.masked_fill(~new, -1).sort(dim=-1, descending=True).values
    return replace(links, slots=links.slots.masked_scatter(target, added[added >= 0]))


def sparse_temporal_reads(links: SparseLinks, read_w: SparseWeights, k: int) -> tuple[SparseWeights, SparseWeights]:
    """f = L w^R and b = L_b w^R through the stored rows, each cut to its top K per head.

    read_w: indices, weights [B, R, Q] -> (forward, backward) with indices, weights [B, R, K].
    """
    total, _ = group_sum(read_w.indices, read_w.weights)
    read_slots, order = read_w.indices.sort(dim=-1)
    read_values = total.gather(-1, order)
    batch, heads, _ = read_slots.shape

    def through(indices: Tensor, values: Tensor) -> SparseWeights:
        rows = indices.shape[1]
        queries = indices.reshape(batch, 1, -1).expand(-1, heads, -1)
        at_columns = _lookup(read_slots, read_values, queries).view(batch, heads, rows, -1)
        per_row = (at_columns * values.unsqueeze(1)).sum(-1)  # [B, R, S]
        # k zero-weight candidates on slot 0 so that top-K exists while few rows are stored
        candidates = torch.cat([per_row, per_row.new_zeros(batch, heads, k)], dim=-1)
        slots = torch.cat(
            [links.slots.clamp(min=0).unsqueeze(1).expand(-1, heads, -1), links.slots.new_zeros(batch, heads, k)],
            dim=-1,
        )
        top = torch.topk(candidates, k, dim=-1)
        return SparseWeights(slots.gather(-1, top.indices), top.values)

    forward = through(links.forward_indices, links.forward_values)
    backward = through(links.backward_indices, links.backward_values)
    return forward, backward


@dataclass
class SDNCInterface(SAMInterface):
    """SAM's interface plus read_modes [B, R, 3]: (backward, content, forward), rows sum to 1."""

    read_modes: Tensor = None


@dataclass
class SDNCState(SAMState):
    """SAMState plus the sparse links; read_weights hold 3K entries per head."""

    links: SparseLinks = None

    def detach(self) -> "SDNCState":
        return replace(super().detach(), links=self.links.detach())

    def reset(self, mask: Tensor) -> "SDNCState":
        state = super().reset(mask)
        links, rows = self.links, mask.view(-1, 1)
        cleared = SparseLinks(
            links.slots.masked_fill(rows, -1),
            links.forward_indices.masked_fill(rows.unsqueeze(-1), -1),
            links.forward_values.masked_fill(rows.unsqueeze(-1), 0),
            links.backward_indices.masked_fill(rows.unsqueeze(-1), -1),
            links.backward_values.masked_fill(rows.unsqueeze(-1), 0),
            links.precedence_indices.masked_fill(rows, -1),
            links.precedence_values.masked_fill(rows, 0),
        )
        return replace(state, links=cleared)


class SDNCMemory(SAMMemory):
    """Sparse DNC: SAM's memory, LRU and writes, plus sparse temporal links with K_L entries per row.

    Interface per step [B, R*W + R + W + 2 + 3R]: SAM's, then read modes (softmax over 3 per head).
    """

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
        no_rows = torch.empty(batch, 0, self.link_k, dtype=torch.int64, device=device)
        links = SparseLinks(
            torch.empty(batch, 0, dtype=torch.int64, device=device),
            no_rows,
            no_rows.to(dtype),
            no_rows,
            no_rows.to(dtype),
            torch.full((batch, self.link_k), -1, dtype=torch.int64, device=device),
            torch.zeros(batch, self.link_k, dtype=dtype, device=device),
        )
        return SDNCState(**{**vars(sam), "read_weights": reads, "links": links})

    def step(self, state: SDNCState, interface: Tensor | SDNCInterface) -> tuple[Tensor, SDNCState]:
        """One SDNC step (reference/sdnc.py's order): -> (reads [B, R, W], state)."""
        parts = interface if isinstance(interface, SDNCInterface) else self.split_interface(interface)
        with region("memory.write"):
            write_w = self.write(state, parts.add, parts.write_gate, parts.interp_gate)
        with region("memory.links"):
            links = sparse_link_update(state.links, write_w, self.link_k)
            forward, backward = sparse_temporal_reads(links, state.read_weights, self.k)

        with region("memory.read"):
            batch, heads, k = parts.keys.shape[0], self.num_reads, self.k
            content_slots = state.memory.store.search(parts.keys, k)
            slots = torch.cat([backward.indices, content_slots, forward.indices], dim=-1)  # [B, R, 3K]
            rows = state.memory.gather(slots.reshape(batch, -1))  # [B, R*3K, W]
            # the content part of head r sits at rows r*3K + K ... r*3K + 2K - 1
            local = (torch.arange(heads, device=slots.device).view(heads, 1) * 3 * k + k + torch.arange(k)).expand(
                batch, -1, -1
            )
            content, _ = ops.sparse_read(rows, local, parts.keys, parts.strengths)
            modes = parts.read_modes
            weights = torch.cat(
                [modes[..., :1] * backward.weights, modes[..., 1:2] * content, modes[..., 2:] * forward.weights],
                dim=-1,
            )
            reads = torch.einsum("brq,brqw->brw", weights, rows.view(batch, heads, 3 * k, -1))
            read_w = SparseWeights(slots, weights)
        with region("memory.lru"):
            self.record_access(state, write_w, read_w)
        return reads, replace(state, read_weights=read_w, write_weights=write_w, links=links, step=state.step + 1)
