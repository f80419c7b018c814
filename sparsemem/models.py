"""Memory-augmented models with an nn.LSTM-like API: NTM, DNC and the sparse SAM, SDNC.

    model = sm.DNC(input_size=10, hidden_size=64, num_slots=32, word_size=16, num_reads=2)
    y, state = model(x)            # x [B, T, input_size] -> y [B, T, output_size or hidden_size]
    y, state = model(x2, state)    # carry on; state.detach() for truncated BPTT

MemoryModel is the whole recurrence; a model is MemoryModel with a memory module
(sparsemem.memory.Memory). Each time step t:

    h_t, c_t   = controller([x_t ; r_{t-1}], c_{t-1})      # read vectors fed back
    reads, m_t = memory.step(m_{t-1}, memory.split_interface(interface(h_t)))
    y_t        = output([h_t ; r_t])                        # as in the DNC paper

A new memory type plugs in by subclassing MemoryModel and passing its Memory to
MemoryModel.__init__ (see DNC below); the loop, controller handling, read feedback,
output layer, state handling and input checks are shared.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsemem import _checks
from sparsemem._profiling import region
from sparsemem.memory import DNCMemory, Memory, NTMMemory, SAMMemory, SDNCMemory
from sparsemem.memory.base import check_mask
from sparsemem.memory.sam import SparseWeights
from sparsemem.ops import dnc_sequence, sam_sequence

_CELLS = (nn.LSTMCell, nn.GRUCell, nn.RNNCell)


@dataclasses.dataclass
class ModelState:
    """The recurrent state of a MemoryModel, batch first in every tensor.

    controller: the controller's state, a tuple of tensors [B, ...] ((h, c) for the default
    LSTM cell, () for a feed-forward controller); access: the memory module's state (memory,
    usage, links, ...); reads [B, R, W]: the last read vectors, fed to the controller next step.
    memory, read_weights and write_weights are the access state's, for inspection and plots.
    """

    controller: tuple[Tensor, ...]
    access: Any
    reads: Tensor

    @property
    def batch_size(self) -> int:
        return self.reads.shape[0]

    @property
    def memory(self) -> Any:
        return self.access.memory

    @property
    def read_weights(self) -> Any:
        return self.access.read_weights

    @property
    def write_weights(self) -> Any:
        return self.access.write_weights

    def detach(self) -> "ModelState":
        """The same values cut from the autograd graph: the next forward's backward stops here
        (truncated BPTT)."""
        return ModelState(tuple(c.detach() for c in self.controller), self.access.detach(), self.reads.detach())

    def clone(self) -> "ModelState":
        """An independent copy to branch from (a sparse memory's rows, index and LRU copied:
        see SAMState.clone)."""
        return ModelState(tuple(c.clone() for c in self.controller), self.access.clone(), self.reads.clone())

    def reset(self, mask: Tensor) -> "ModelState":
        """A state where batch rows with mask[B] True restart (fresh memory, controller state
        and reads zero) and the other rows carry on: for streams whose episodes end at different steps."""
        mask = check_mask(mask, self.batch_size)

        def zero_rows(value: Tensor) -> Tensor:
            return value.masked_fill(mask.view(-1, *([1] * (value.dim() - 1))), 0)

        return ModelState(tuple(zero_rows(c) for c in self.controller), self.access.reset(mask), zero_rows(self.reads))


class MemoryModel(nn.Module):
    """A controller, a memory module, and the output layer y_t = Linear([h_t ; r_t]).

    controller: any nn.Module mapping [B, input_size + R*W] -> [B, hidden_size]. Default:
    nn.LSTMCell. nn.LSTMCell, nn.GRUCell and nn.RNNCell carry their state; any other module
    is feed-forward (called as controller(x)) unless it has init_state(B) -> a tuple of
    tensors [B, ...] and forward(x, state) -> (h, state). reset() zeros a controller state.
    output_size: features of y (default hidden_size). batch_first: x and y are [B, T, ...]
    (else [T, B, ...]); the state is always batch first. bypass_dropout: dropout, in training
    only, on the h_t that goes straight to the output layer (not on the interface, nor on r_t):
    the "bypass dropout" of Franke et al. 2018 (rsDNC), which pushes what the output needs
    through the memory rather than the controller's own state (bAbI: a DNC that memorises its
    training stories).

    Extension point: a subclass builds its Memory and passes it here; nothing else is needed.
    """

    def __init__(
        self,
        memory: Memory,
        input_size: int,
        hidden_size: int,
        controller: nn.Module | None = None,
        output_size: int | None = None,
        batch_first: bool = True,
        bypass_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size), ("output_size", output_size)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if controller is not None and not isinstance(controller, nn.Module):
            raise ValueError(f"controller must be an nn.Module; got {type(controller).__name__}")
        if not isinstance(bypass_dropout, int | float) or not 0 <= bypass_dropout < 1:
            raise ValueError(f"bypass_dropout must be a probability in [0, 1); got {bypass_dropout!r}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.output_size = output_size or hidden_size
        self.batch_first = batch_first
        self.memory = memory
        read_size = memory.num_reads * memory.word_size
        self.controller = controller if controller is not None else nn.LSTMCell(input_size + read_size, hidden_size)
        self.interface = nn.Linear(hidden_size, memory.interface_size)
        self.output = nn.Linear(hidden_size + read_size, self.output_size)
        # Identity at 0: no dropout call per step, and the step is what it was before the option
        self.bypass = nn.Dropout(bypass_dropout) if bypass_dropout else nn.Identity()
        self._compiled_step: Callable | None = None  # compile_step's

    def init_state(self, batch_size: int, memory: Tensor | None = None) -> ModelState:
        """A fresh state for a batch of B, on the model's device and dtype.

        memory [B, N, W] (or [N, W], shared by the batch): start from these rows, e.g. a
        preloaded knowledge base; they count as written."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size B must be a positive int; got {batch_size!r}")
        weight = self.output.weight
        device, dtype = weight.device, weight.dtype
        if memory is not None and memory.dtype != dtype:
            raise ValueError(f"memory is {memory.dtype} but the model's parameters are {dtype}; convert one of them")
        access = self.memory.init_state(batch_size, memory, device=device, dtype=dtype)
        R, W = self.memory.num_reads, self.memory.word_size
        reads = torch.zeros(batch_size, R, W, device=device, dtype=dtype)
        return ModelState(self._controller_init(batch_size, device, dtype), access, reads)

    def forward(
        self, x: Tensor, state: ModelState | None = None, lengths: Tensor | None = None
    ) -> tuple[Tensor, ModelState]:
        """x [B, T, input_size] ([T, B, input_size] if not batch_first) -> (y [B, T, output_size], state).

        lengths int64 [B] in [1, T] (a padded batch): at steps t >= lengths[b] row b writes
        nothing and keeps its state, and its outputs are zeros, so each row ends as if run alone."""
        self._check_input(x, state)
        time_dim = 1 if self.batch_first else 0
        batch = x.shape[1 - time_dim]
        self._check_lengths(lengths, batch, x.shape[time_dim], x.device)
        if state is None:
            state = self.init_state(batch)
        # Before the shortest row ends every row is active: those steps take the unpadded path
        # (no where per state field, forward and backward; a length-bucketed batch is mostly such
        # steps). One host read of the minimum per forward. active [T, B]: the padded batch's steps.
        steps = x.shape[time_dim]
        every_row_until = steps if lengths is None else int(lengths.min())
        active = None if every_row_until == steps else torch.arange(steps, device=x.device).unsqueeze(1) < lengths
        # Time-major and contiguous: every x_t has strides (input_size, 1) whatever T is, so a
        # compiled step (compile_step) serves every length without recompiling for x_t's strides.
        x = x.movedim(time_dim, 0).contiguous()
        hiddens, reads, start = [], [], 0
        one_op = self._one_op(x)
        if one_op is not None:
            every_hidden, every_reads, state = one_op(x, state, active)
            hiddens, reads, start = [every_hidden], [every_reads], steps
        # x was checked above and the state's values come from checked steps: the steps' ops
        # skip their value checks (a sync each, per op per step) unless SPARSEMEM_DEBUG=1
        # the compiled step trains; without gradients (validation, scoring) the eager one runs, as
        # a no-grad graph would be one more compile for a pass that takes seconds
        step = self._compiled_step if self._compiled_step is not None and torch.is_grad_enabled() else self._step
        with _checks.inputs_checked():
            for t in range(start, steps):
                hidden, reads_t, state = step(x[t], state, None if t < every_row_until else t < lengths)
                hiddens.append(hidden.unsqueeze(0))
                reads.append(reads_t.unsqueeze(0))
        # The output layer reads each step's h_t and r_t but feeds nothing back: one product over
        # all T steps instead of one per step
        with region("controller"):
            hidden, reads = torch.cat(hiddens), torch.cat(reads)
            y = self.output(torch.cat([self.bypass(hidden), reads.flatten(2)], dim=-1))
        if active is not None:  # padded steps output zeros
            y = torch.where(active.unsqueeze(-1), y, 0)
        return y.movedim(0, time_dim).contiguous(), state

    def compile_step(self, **options: Any) -> "MemoryModel":
        """Compile the model's time step with torch.compile (options go to it; default
        dynamic=False) for the forwards that record gradients, in place, and return the model;
        forwards under no_grad run the eager step. forward's loop over the T steps stays in Python
        and feeds each step a contiguous [B, input_size], so one graph serves every sequence
        length: the first call compiles it (about 40 s on a CPU core); the first step of a fresh
        state (reads without a gradient yet), a padded batch's steps with rows ended and each new
        batch size compile one more. It pays where a step is many small ops (torch fuses the
        pointwise ones around the memory's kernels): an NTM's training step took 1.1x less time on
        this project's 2-core CPU. A DNC's step no longer gains: its three fused ops with their
        autograd in C++ leave little to fuse (eager 6.44 against 7.35 ms a training step on
        train's DNC copy, 12.1 against 12.5 ms at the NTM paper's sizes; it was 1.4-1.6x faster
        before them), and where the eager forward runs a DNC's steps as one op (dnc_sequence: an
        LSTMCell controller, small links) it is faster still; a compiled step runs the step loop.
        Results agree with the eager step within float rounding. Not for SAM and SDNC: their step
        reads its nearest-neighbour index on the host, with data-dependent shapes, which breaks the
        graph into pieces that recompile (minutes, then slower than eager)."""
        if isinstance(self.memory, SAMMemory):
            raise ValueError(
                f"compile_step is for dense memories (DNC, NTM); a {type(self).__name__}'s step searches its index "
                "on the host with data-dependent shapes, which torch.compile breaks into pieces"
            )
        self._compiled_step = torch.compile(self._step, **({"dynamic": False} | options))
        return self

    def _step(self, x: Tensor, state: ModelState, active: Tensor | None = None) -> tuple[Tensor, Tensor, ModelState]:
        """One time step -> (h_t [B, hidden_size], r_t [B, R, W], state): forward's output layer
        turns every step's h_t and r_t into y at once."""
        with region("controller"):
            controller_in = torch.cat([x, state.reads.flatten(1)], dim=-1)
            hidden, controller_state = self._controller_step(controller_in, state.controller)
            interface = self.memory.split_interface(self.interface(hidden))
        # a memory written before padded batches takes (state, interface): pass active only when set
        step_args = (state.access, interface) if active is None else (state.access, interface, active)
        reads, access = self.memory.step(*step_args)
        if active is None:
            return hidden, reads, ModelState(controller_state, access, reads)

        def kept(new: Tensor, old: Tensor) -> Tensor:
            return torch.where(active.view(-1, *([1] * (new.dim() - 1))), new, old)

        controller_state = tuple(kept(new, old) for new, old in zip(controller_state, state.controller, strict=True))
        return hidden, reads, ModelState(controller_state, access, kept(reads, state.reads))

    def _one_op(self, x: Tensor) -> Callable | None:
        """The method that runs all of forward's steps as one op (_dnc_steps, _sam_steps), or None
        for the step loop. Under an nn.LSTMCell, in float32 or float64, where the op has its C++
        kernel, and with no compiled step or model (torch.compile traces the step loop): a
        DNCMemory, or a SAMMemory or SDNCMemory of at most sequence_max_slots slots (not a
        subclass, such as the sharded memories, whose step may differ)."""
        if (
            torch.compiler.is_compiling()
            or type(self.controller) is not nn.LSTMCell
            or self._compiled_step is not None
            or x.dtype not in (torch.float32, torch.float64)
        ):
            return None
        memory = self.memory
        if type(memory) is DNCMemory and dnc_sequence.runs_in_cpp(x.device):
            return self._dnc_steps
        op = {SAMMemory: "sam_sequence", SDNCMemory: "sdnc_sequence"}.get(type(memory))
        if op is not None and memory.runs_as_one_op() and sam_sequence.runs_in_cpp(op, x.device):
            return self._sam_steps
        return None

    def _lstm_inputs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The LSTM cell's parts for a sequence op: (gates_x [T, B, 4H], the input's part of the gates
        and both biases, one product over all T steps; weight_rh [4H, R*W + H], the reads' and the
        hidden state's weights side by side)."""
        cell, X = self.controller, self.input_size
        bias = None if cell.bias_ih is None else cell.bias_ih + cell.bias_hh
        return F.linear(x, cell.weight_ih[:, :X], bias), torch.cat([cell.weight_ih[:, X:], cell.weight_hh], dim=1)

    def _dnc_steps(self, x: Tensor, state: ModelState, active: Tensor | None) -> tuple[Tensor, Tensor, ModelState]:
        """x [T, B, input_size] through T steps of dnc_sequence (active [T, B] bool: a padded batch's
        steps, None: every row runs every step) -> (h [T, B, H], r [T, B, R, W], state). The input's
        part of the cell's gates (and both its biases) is one product over all T steps."""
        gates_x, weight_rh = self._lstm_inputs(x)
        access, (hidden, cell_state) = state.access, state.controller
        every_hidden, every_reads, cell_state, *memory_state = dnc_sequence.dnc_sequence(
            gates_x,
            hidden,
            cell_state,
            state.reads,
            access.memory,
            access.usage,
            access.link,
            access.precedence,
            access.read_weights,
            access.write_weights,
            weight_rh,
            self.interface.weight,
            self.interface.bias,
            x.new_ones(x.shape[:2], dtype=torch.bool) if active is None else active,
            self.memory.sequence_checkpoint_every(access, x.shape[0]),
        )
        fields = ("memory", "usage", "link", "precedence", "read_weights", "write_weights")
        access = dataclasses.replace(access, **dict(zip(fields, memory_state, strict=True)))
        return every_hidden, every_reads, ModelState((every_hidden[-1], cell_state), access, every_reads[-1])

    def _sam_steps(self, x: Tensor, state: ModelState, active: Tensor | None) -> tuple[Tensor, Tensor, ModelState]:
        """x [T, B, input_size] through T steps of sam_sequence, or an SDNC's sdnc_sequence (active
        [T, B] bool, None: every row runs every step) -> (h [T, B, H], r [T, B, R, W], state). The op
        runs on a dense copy of the memory (all N rows gathered through the state's journal, so
        gradients reach what wrote them) and of an SDNC's link store (all 2N rows, likewise); the
        rows it wrote are stored back through the journals and its LRU stamps into the LRU, all as
        one version of the memory's timeline (states stay values: memory/versions.py)."""
        gates_x, weight_rh = self._lstm_inputs(x)
        (hidden, cell_state), steps = state.controller, x.shape[0]
        access = state.access.advanced()
        rows, usage, links = access.memory, access.usage, getattr(access, "links", None)
        store = rows.store
        batch, num_slots, R, K = store.batch, store.num_slots, self.memory.num_reads, self.memory.k
        J = R * self.memory.read_width * K + 1
        slots = torch.arange(num_slots, device=x.device).expand(batch, -1)
        read_w, write_w = access.read_weights, access.write_weights
        if write_w.indices.shape[-1] != J:  # a fresh state's placeholder: step 0 replaces it
            write_w = SparseWeights(slots.new_zeros(batch, J), x.new_zeros(batch, J))
        sam_args = (gates_x, hidden, cell_state, state.reads, rows.gather(slots), usage.stamps(slots).long())
        sam_args += (store.written[: batch * num_slots].view(batch, num_slots).clone(),)  # the store marks its writes
        sam_args += (read_w.indices, read_w.weights, write_w.indices, write_w.weights)
        rest = (weight_rh, self.interface.weight, self.interface.bias)
        rest += (x.new_ones(x.shape[:2], dtype=torch.bool) if active is None else active, int(usage.clock))
        if links is None:
            out = sam_sequence.sam_sequence(*sam_args, *rest)
        else:
            link_ids = torch.arange(2 * num_slots, device=x.device).expand(batch, -1)
            link_args = (*links.gather(link_ids), links.precedence_indices, links.precedence_values)
            out = sam_sequence.sdnc_sequence(*sam_args, *link_args, *rest)
        every_hidden, every_reads, cell_state, memory, stamps, *weights, written_now = out[:10]
        # the rows written, each batch row's first (in slot order), its first one again as padding
        written, order = written_now.sort(dim=-1, descending=True, stable=True)
        count = int(written_now.sum(-1).max())
        first = written[:, :count]
        written_slots = torch.where(first, order[:, :count], order[:, :1])
        words = memory.gather(1, written_slots.unsqueeze(-1).expand(-1, -1, store.word_size))
        rows.scatter(written_slots, words, first)
        usage.restamp(slots, stamps, steps)
        read_weights, write_weights = SparseWeights(*weights[:2]), SparseWeights(*weights[2:])
        access = dataclasses.replace(
            access, read_weights=read_weights, write_weights=write_weights, step=access.step + steps
        )
        if links is not None:
            link_idx, link_w, precedence_idx, precedence_w, linked_now = out[10:]
            # the link rows the updates could change, each batch row's first, then -1 (dropped)
            linked, order = linked_now.sort(dim=-1, descending=True, stable=True)
            count = max(1, int(linked_now.sum(-1).max()))
            ids = torch.where(linked[:, :count], order[:, :count], -1)
            places = ids.clamp(min=0).unsqueeze(-1).expand(-1, -1, link_idx.shape[-1])
            links.scatter(ids, link_idx.gather(1, places), link_w.gather(1, places))
            links = dataclasses.replace(links, precedence_indices=precedence_idx, precedence_values=precedence_w)
            access = dataclasses.replace(access, links=links)
        return every_hidden, every_reads, ModelState((every_hidden[-1], cell_state), access, every_reads[-1])

    def _check_lengths(self, lengths: object, batch: int, steps: int, device: torch.device) -> None:
        if lengths is None:
            return
        if not isinstance(lengths, Tensor) or lengths.dtype != torch.int64 or tuple(lengths.shape) != (batch,):
            got = f"{lengths.dtype} {list(lengths.shape)}" if isinstance(lengths, Tensor) else type(lengths).__name__
            raise ValueError(f"lengths must be an int64 tensor [B] with B={batch}; got {got}")
        if lengths.device != device:
            raise ValueError(f"lengths is on {lengths.device} but x is on {device}")
        if _checks.on_host(device) or _checks.debug():
            low, high = int(lengths.min()), int(lengths.max())
            if low < 1 or high > steps:
                raise ValueError(f"lengths must be in [1, T={steps}]; got values in [{low}, {high}]")

    def _controller_init(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, ...]:
        controller = self.controller
        if isinstance(controller, _CELLS):
            zeros = torch.zeros(batch_size, controller.hidden_size, device=device, dtype=dtype)
            return (zeros, zeros.clone()) if isinstance(controller, nn.LSTMCell) else (zeros,)
        if hasattr(controller, "init_state"):
            return tuple(controller.init_state(batch_size))
        return ()

    def _controller_step(self, x: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        controller = self.controller
        if isinstance(controller, nn.LSTMCell):
            hidden, cell = controller(x, state)
            new_state = (hidden, cell)
        elif isinstance(controller, _CELLS):
            hidden = controller(x, state[0])
            new_state = (hidden,)
        elif hasattr(controller, "init_state"):
            hidden, new_state = controller(x, state)
        else:
            hidden, new_state = controller(x), ()
        expected = (x.shape[0], self.hidden_size)
        if not isinstance(hidden, Tensor) or tuple(hidden.shape) != expected:
            got = list(hidden.shape) if isinstance(hidden, Tensor) else type(hidden).__name__
            raise ValueError(
                f"controller must map [B, input_size + R*W] to [B, hidden_size] = {list(expected)}; got {got}"
            )
        return hidden, tuple(new_state)

    def _check_input(self, x: object, state: ModelState | None) -> None:
        layout = "[B, T, input_size]" if self.batch_first else "[T, B, input_size]"
        if not isinstance(x, Tensor):
            raise ValueError(f"x must be a tensor {layout}; got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.input_size:
            raise ValueError(f"x must be {layout} with input_size={self.input_size}; got {list(x.shape)}")
        time_steps = x.shape[1] if self.batch_first else x.shape[0]
        if time_steps == 0:
            raise ValueError(f"x must have at least one time step; got {list(x.shape)}")
        weight = self.output.weight
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor; got {x.dtype}")
        if x.dtype != weight.dtype:
            raise ValueError(f"x is {x.dtype} but the model's parameters are {weight.dtype}; convert one of them")
        if x.device != weight.device:
            raise ValueError(f"x is on {x.device} but the model is on {weight.device}")
        _checks.check_finite("x (the model input)", x)
        if state is None:
            return
        if not isinstance(state, ModelState):
            raise ValueError(f"state must be a ModelState from this model (or None); got {type(state).__name__}")
        batch = x.shape[0] if self.batch_first else x.shape[1]
        if state.batch_size != batch:
            raise ValueError(
                f"state is for a batch of B={state.batch_size} but x has B={batch}; "
                "start one with model.init_state(B) or pass state=None"
            )
        self.memory.check_state(state.access)
        if state.reads.dtype != x.dtype or state.reads.device != x.device:
            raise ValueError(
                f"state is {state.reads.dtype} on {state.reads.device} but x is {x.dtype} on {x.device}; "
                "start one with model.init_state(B)"
            )

    def extra_repr(self) -> str:
        return f"input_size={self.input_size}, hidden_size={self.hidden_size}, output_size={self.output_size}"


class DNC(MemoryModel):
    """Differentiable Neural Computer (Graves et al. 2016): MemoryModel with a DNCMemory
    of N slots of W and R read heads."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_slots: int = 64,
        word_size: int = 32,
        num_reads: int = 4,
        controller: nn.Module | None = None,
        output_size: int | None = None,
        batch_first: bool = True,
        bypass_dropout: float = 0.0,
    ) -> None:
        memory = DNCMemory(num_slots, word_size, num_reads)
        super().__init__(memory, input_size, hidden_size, controller, output_size, batch_first, bypass_dropout)


class NTM(MemoryModel):
    """Neural Turing Machine (Graves et al. 2014): MemoryModel with an NTMMemory of N slots
    of W, R read heads, num_writes write heads and shifts over shift_range S offsets."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_slots: int = 128,
        word_size: int = 20,
        num_reads: int = 1,
        controller: nn.Module | None = None,
        output_size: int | None = None,
        batch_first: bool = True,
        shift_range: int = 3,
        num_writes: int = 1,
        bypass_dropout: float = 0.0,
    ) -> None:
        memory = NTMMemory(num_slots, word_size, num_reads, shift_range, num_writes)
        super().__init__(memory, input_size, hidden_size, controller, output_size, batch_first, bypass_dropout)


class SAM(MemoryModel):
    """Sparse Access Memory (Rae et al. 2016): MemoryModel with a SAMMemory of N slots of W,
    R read heads reading K slots each, found by `index` ("exact", "ivf", "faiss-hnsw", "faiss-ivf").
    Cost per step grows with K and the index, not N; backward keeps O(T K W) extra memory. On the
    CPU, up to SAMMemory.sequence_max_slots slots (16384) under the default LSTMCell, forward runs
    its T steps as one op (ops.sam_sequence) whose search is exact whatever the index.

    shard_group: a torch.distributed ProcessGroup over which the N slots are split (each of its
    P ranks holds N/P of them, the first N mod P ranks one more, with that shard's index and LRU;
    memory/sharded.py). Every rank of the group runs the model on the same inputs with the same
    parameters and gets the unsharded model's outputs and gradients."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_slots: int = 1024,
        word_size: int = 32,
        num_reads: int = 4,
        k: int = 8,
        index: str = "exact",
        controller: nn.Module | None = None,
        output_size: int | None = None,
        batch_first: bool = True,
        shard_group: object = None,
        bypass_dropout: float = 0.0,
    ) -> None:
        if shard_group is None:
            memory = SAMMemory(num_slots, word_size, num_reads, k, index)
        else:
            from sparsemem.memory.sharded import ShardedSAMMemory

            memory = ShardedSAMMemory(num_slots, word_size, num_reads, k, index, shard_group=shard_group)
        super().__init__(memory, input_size, hidden_size, controller, output_size, batch_first, bypass_dropout)
        memory.init_interface_bias(self.interface.bias)  # strong LRU writes, sharp reads (see there)


class SDNC(MemoryModel):
    """Sparse DNC (Rae et al. 2016): SAM's memory plus temporal links with K_L = link_k
    entries per row (SDNCMemory). On the CPU, up to SAMMemory.sequence_max_slots slots (16384)
    under the default LSTMCell, forward runs its T steps as one op (ops.sdnc_sequence), its search
    exact whatever the index. shard_group: as SAM's (the link rows are replicated)."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_slots: int = 1024,
        word_size: int = 32,
        num_reads: int = 4,
        k: int = 8,
        index: str = "exact",
        link_k: int = 8,
        controller: nn.Module | None = None,
        output_size: int | None = None,
        batch_first: bool = True,
        shard_group: object = None,
        bypass_dropout: float = 0.0,
    ) -> None:
        if shard_group is None:
            memory = SDNCMemory(num_slots, word_size, num_reads, k, index, link_k)
        else:
            from sparsemem.memory.sharded import ShardedSDNCMemory

            memory = ShardedSDNCMemory(num_slots, word_size, num_reads, k, index, link_k, shard_group=shard_group)
        super().__init__(memory, input_size, hidden_size, controller, output_size, batch_first, bypass_dropout)
        # SAM's init (its part of the interface comes first): fewer steps to learn copy
        memory.init_interface_bias(self.interface.bias)
