"""The journal: one BPTT segment over a store of lazy rows, written in place (DESIGN.md, "Sparse backward").

JournaledMemory is one BPTT segment over a RowStore (or SDNC's LinkStore). Reads gather rows,
writes change rows in place, through autograd Functions chained by a "version token", so
autograd runs their backwards in exactly the reverse order of the forward:

    source -> gather -> write -> gather -> ... -> token held by the state

A write (SAM's: new = old (1 - erase) + w a^T on J rows) is one node and one kernel
(sparsemem.ops.journaled_write): it reads the rows it overwrites, keeps them as the
step's journal entry (J*W, saved by autograd; the journal proper holds only row ids), and
stores the new rows. Backward never reads the memory: it leaves the memory holding the
end-of-forward state, bit-identical to a forward-only run, and needs no undo/redo pass.
Gradients live in a row-keyed buffer (one row per row id the segment touched, never
[B, N, W]); a write's backward takes the gradient of the rows it wrote from it (zeroing
those rows: the old contents did not reach later steps), runs sparse_write's backward and
adds the old rows' gradient back; a gather's backward adds into it. scatter (rows computed
elsewhere, stored in place) is the general form of a write, used by SDNC's link rows. The
initial memory gets a gradient only when it was passed in with requires_grad. Under
no_grad nothing is recorded.
"""

import numpy as np
import torch
from torch import Tensor

from sparsemem import _checks
from sparsemem.memory.row_store import LazyRows
from sparsemem.ops.journaled_write import journaled_write_backward


class Journal:
    """A segment's touched row ids and, during backward, the row-keyed gradient buffer."""

    def __init__(self, store: LazyRows, parent: "Journal | None" = None, branch_point: int = 0) -> None:
        self.store = store
        self.parent, self.branch_point = parent, branch_point
        self._logged: list[Tensor] = []
        self._row_ids: Tensor | None = None
        self._grad: Tensor | None = None
        self._task = -1
        self._tokens = 0
        self._handed: dict[tuple[int, int], list[tuple[Tensor, Tensor]]] = {}

    def log(self, row_ids: Tensor) -> None:
        """Row ids a node touches; a branch's ids are its ancestors' too, whose buffers take its gradient."""
        journal = self
        while journal is not None:
            journal._logged.append(row_ids)
            journal = journal.parent

    def next_token(self) -> int:
        """The position of the version token a new node makes (the source's is 0)."""
        self._tokens += 1
        return self._tokens

    def hand(self, position: int, row_ids: Tensor, grad: Tensor) -> None:
        """A branch's gradient at the rows row_ids [P] when it started from this journal's token
        `position`; the node that made that token adds it in (it runs after every user of it)."""
        key = (torch._C._current_graph_task_id(), position)
        self._handed.setdefault(key, []).append((row_ids, grad))

    def receive(self, position: int) -> None:
        """Add what branches handed in at token `position` (a node's backward calls this first)."""
        task = torch._C._current_graph_task_id()
        for row_ids, grad in self._handed.pop((task, position), ()):
            self.accumulate(self.positions(row_ids, grad.dtype), grad)

    def _in_pass(self) -> bool:
        # One buffer per backward pass: a pass that skips the source (autograd.grad with
        # inputs that do not need it) must not leave its gradients to the next pass.
        return self._grad is not None and self._task == torch._C._current_graph_task_id()

    def positions(self, row_ids: Tensor, dtype: torch.dtype) -> Tensor:
        """Where the gradient of row_ids [M] lives in this pass's buffer (made on the pass's first call)."""
        on_host = _checks.on_host(row_ids.device)
        if not self._in_pass():
            self._task = torch._C._current_graph_task_id()
            logged = torch.cat(self._logged)
            # Sorted; on a device duplicates are kept (an id's buffer row is its first occurrence,
            # searchsorted left, the rest stay zero), since torch.unique must sync for its size.
            # On the host numpy's sorts are several times faster than torch's on these sizes.
            self._row_ids = torch.from_numpy(np.unique(logged.numpy())) if on_host else logged.sort().values
            self._grad = torch.zeros(len(self._row_ids), self.store.word_size, dtype=dtype, device=row_ids.device)
        if on_host:
            return torch.from_numpy(np.searchsorted(self._row_ids.numpy(), row_ids.numpy()))
        return torch.searchsorted(self._row_ids, row_ids)

    def buffer(self) -> Tensor:
        """This pass's gradient buffer [P, W] (after positions())."""
        return self._grad

    def accumulate(self, positions: Tensor, grad: Tensor) -> None:
        """Add grad [M, W] at positions [M] (from positions())."""
        self._grad.index_add_(0, positions, grad)

    def take(self, positions: Tensor, first: Tensor) -> Tensor:
        """The gradient of rows just written at positions [M], once per distinct row id (where first
        [M] is True, zero elsewhere); those rows' buffer is zeroed."""
        grad = self._grad[positions] * first.unsqueeze(-1)
        self._grad.index_fill_(0, positions, 0)
        return grad

    def clear(self, mask: Tensor) -> None:
        """Drop the gradient gathered so far for every slot of the batch rows where mask [B] is True."""
        if self._in_pass():
            batch, slots = self.store.batch, self.store.num_slots
            # ids past the B*N rows (a store's spare row for dropped writes) belong to no batch row
            owned = self._row_ids < batch * slots
            rows = mask.to(self._row_ids.device)[(self._row_ids // slots).clamp(max=batch - 1)] & owned
            self._grad.masked_fill_(rows.unsqueeze(-1), 0)

    def finish(self) -> tuple[Tensor | None, Tensor | None]:
        """(row ids, grad) left for the initial memory; the buffer is dropped."""
        row_ids, grad = self._row_ids, self._grad
        self._row_ids = self._grad = None
        return row_ids, grad


class _Source(torch.autograd.Function):
    """The first version token of a segment; its backward runs last and ends the segment's pass.

    anchor: a branch's parent token (its gradient goes to the parent journal), or the initial
    memory [B, N, W] (which gets the gradient left, dense), or a scalar that ends the chain."""

    @staticmethod
    def forward(ctx, journal: Journal, anchor: Tensor) -> Tensor:
        ctx.journal = journal
        ctx.anchor_shape = anchor.shape
        return anchor.new_empty(0)

    @staticmethod
    def backward(ctx, _grad_token: Tensor):
        journal = ctx.journal
        journal.receive(0)
        row_ids, grad = journal.finish()
        if journal.parent is not None:
            if row_ids is not None:
                journal.parent.hand(journal.branch_point, row_ids, grad)
            return None, None
        if not ctx.needs_input_grad[1] or len(ctx.anchor_shape) != 3:
            return None, None
        store = journal.store
        dense = grad.new_zeros(store.batch * store.num_slots, store.word_size)
        if row_ids is not None:
            slots = row_ids < len(dense)  # not a store's spare row (padding's writes land there)
            dense.index_add_(0, row_ids[slots], grad[slots])  # a repeated id's extra rows hold zeros
        return None, dense.view(ctx.anchor_shape)


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, journal: Journal, token: Tensor, row_ids: Tensor) -> tuple[Tensor, Tensor]:
        ctx.journal, ctx.position = journal, journal.next_token()
        ctx.save_for_backward(row_ids)
        journal.log(row_ids)
        return journal.store.read(row_ids), token.new_empty(0)

    @staticmethod
    def backward(ctx, grad_rows: Tensor, _grad_token: Tensor):
        (row_ids,) = ctx.saved_tensors
        ctx.journal.receive(ctx.position)
        ctx.journal.accumulate(ctx.journal.positions(row_ids, grad_rows.dtype), grad_rows)
        return None, None, None


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, journal: Journal, token: Tensor, row_ids: Tensor, rows: Tensor, first: Tensor) -> Tensor:
        ctx.journal, ctx.position = journal, journal.next_token()
        ctx.save_for_backward(row_ids, first)
        journal.log(row_ids)
        journal.store.write(row_ids, rows.detach())
        return token.new_empty(0)

    @staticmethod
    def backward(ctx, _grad_token: Tensor):
        row_ids, first = ctx.saved_tensors
        journal = ctx.journal
        journal.receive(ctx.position)
        return None, None, None, journal.take(journal.positions(row_ids, journal.store.rows.dtype), first), None


class _Write(torch.autograd.Function):
    """A step's write in one node: new = old (1 - erase) + w a^T in place (RowStore.sparse_write),
    the old rows kept for backward. Backward (journaled_write_backward): the written rows' gradient
    taken from the buffer (and zeroed there), through the write, the old rows' gradient added back,
    at positions found once."""

    @staticmethod
    def forward(
        ctx, journal: Journal, token: Tensor, slots: Tensor, weights: Tensor, add: Tensor, erase_rows, first, active
    ):
        store = journal.store
        ctx.journal, ctx.position = journal, journal.next_token()
        row_ids, old, new = store.sparse_write(slots, weights, add, erase_rows, active)
        journal.log(row_ids.view(-1))
        ctx.save_for_backward(row_ids, first, old, weights, add, erase_rows, new)
        return token.new_empty(0)

    @staticmethod
    def backward(ctx, _grad_token: Tensor):
        row_ids, first, old, weights, add, erase_rows, new = ctx.saved_tensors
        journal = ctx.journal
        journal.receive(ctx.position)
        positions = journal.positions(row_ids.view(-1), old.dtype).view_as(row_ids)
        grad_weights, grad_add = journaled_write_backward(
            journal.buffer(), positions, first, old, weights, add, erase_rows, new
        )
        return None, None, None, grad_weights, grad_add, None, None, None


class _Reset(torch.autograd.Function):
    """A reset in the version chain: its backward drops the gradient gathered for the reset batch
    rows, so nothing read after the reset reaches what was written before it."""

    @staticmethod
    def forward(ctx, journal: Journal, token: Tensor, mask: Tensor) -> Tensor:
        ctx.journal, ctx.mask, ctx.position = journal, mask, journal.next_token()
        return token.new_empty(0)

    @staticmethod
    def backward(ctx, _grad_token: Tensor):
        ctx.journal.receive(ctx.position)
        ctx.journal.clear(ctx.mask)
        return None, None, None


class JournaledMemory:
    """A state's view of a store of rows (RowStore, or SDNC's LinkStore) within one BPTT segment:
    differentiable gathers and in-place writes, chained by the version token.

    A view is advanced once per step (advance()): the first step from it continues its segment,
    any later one (the same state used again) starts a branch, a journal of its own whose
    backward hands its gradient to this one at the token it started from, so the gradients of
    two forwards from one state are each right and add up when taken together. Which rows the
    store holds is the Timeline's business (memory/versions.py), not the view's.

    initial: the memory passed to init_state; with requires_grad it receives the gradient
    of the rows read before they were overwritten (dense, as the user asked for it).
    """

    def __init__(
        self,
        store: LazyRows,
        initial: Tensor | None = None,
        journal: Journal | None = None,
        token: Tensor | None = None,
        position: int = 0,
    ) -> None:
        self.store = store
        self._initial = initial if initial is not None and initial.requires_grad else None
        self.journal = journal if journal is not None else Journal(store)
        self._token, self._position = token, position
        self._continued = False

    def advance(self) -> "JournaledMemory":
        """The view a step from this one writes through: this segment the first time, a branch after."""
        first, self._continued = not self._continued, True
        if first:
            return JournaledMemory(self.store, self._initial, self.journal, self._token, self._position)
        if self._token is None:  # nothing recorded yet: a new segment from the same start
            return JournaledMemory(self.store, self._initial)
        if not torch.is_grad_enabled():  # no gradient will come back through it: a segment of its own
            return JournaledMemory(self.store)
        branch = Journal(self.store, self.journal, self._position)
        return JournaledMemory(self.store, None, branch, _Source.apply(branch, self._token))

    def token(self) -> Tensor:
        if self._token is None:
            anchor = self._initial
            if anchor is None:
                anchor = torch.zeros((), dtype=self.store.rows.dtype, requires_grad=True)
            self._token = _Source.apply(self.journal, anchor)
        return self._token

    def _chain(self, token: Tensor) -> None:
        self._token, self._position = token, self.journal._tokens

    def gather(self, slots: Tensor, row_ids: Tensor | None = None) -> Tensor:
        """slots [B, Q] -> rows [B, Q, W]; row_ids: the store's row ids of slots, if known."""
        row_ids = self.store.row_ids(slots) if row_ids is None else row_ids
        # nothing recorded in this segment and no initial memory taking a gradient: what the rows hold
        # came from before the segment, so their gradient reaches nothing (a fresh or detached state)
        if torch.is_grad_enabled() and (self._token is not None or self._initial is not None):
            rows, token = _Gather.apply(self.journal, self.token(), row_ids)
            self._chain(token)
        else:
            rows = self.store.read(row_ids)
        return rows.view(*slots.shape, self.store.word_size)

    def scatter(self, slots: Tensor, rows: Tensor, first: Tensor, row_ids: Tensor | None = None) -> None:
        """rows [B, J, W] into slots [B, J] in place; first [B, J] marks one entry per distinct slot
        (duplicates must carry identical rows); row_ids: the store's row ids of slots, if known."""
        row_ids = self.store.row_ids(slots) if row_ids is None else row_ids
        flat_rows = rows.reshape(-1, self.store.word_size)
        if torch.is_grad_enabled():
            self._chain(_Scatter.apply(self.journal, self.token(), row_ids, flat_rows, first.reshape(-1)))
        else:
            self.store.write(row_ids, flat_rows)

    def write(
        self,
        slots: Tensor,
        weights: Tensor,
        add: Tensor,
        erase_rows: Tensor,
        first: Tensor,
        active: Tensor | None = None,
    ) -> None:
        """new = old (1 - erase) + w add^T in place on slots [B, J]: weights [B, J], add [B, W],
        erase_rows [B, J] bool; first [B, J] marks one entry per distinct slot (a repeated slot
        must carry the same weight and erase: its entries store one row); batch rows where
        active [B] is False write nothing."""
        if torch.is_grad_enabled():
            self._chain(_Write.apply(self.journal, self.token(), slots, weights, add, erase_rows, first, active))
        else:
            self.store.sparse_write(slots, weights, add, erase_rows, active)

    def detached(self) -> "JournaledMemory":
        """The same rows, a new segment: no gradient flows to what came before."""
        return JournaledMemory(self.store)

    def reset(self, mask: Tensor) -> None:
        """Batch rows where mask [B] bool is True back to the initial word; under grad no
        gradient crosses the reset."""
        if torch.is_grad_enabled():
            self._chain(_Reset.apply(self.journal, self.token(), mask))
        self.store.forget(mask)
