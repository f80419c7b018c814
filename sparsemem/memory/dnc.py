"""DNCMemory: the Differentiable Neural Computer's memory (Graves et al. 2016).

Dynamic allocation by usage, content lookup, and temporal links between slots
written one after another; each step in the order of DESIGN.md's equations, on
the public ops so the fastest backend of each runs.
"""

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsemem import ops
from sparsemem.memory.base import DenseState, Memory
from sparsemem.reference import split_interface_ref


def oneplus(x: Tensor) -> Tensor:
    """1 + softplus(x): strengths in [1, inf), as in the DNC paper."""
    return 1 + F.softplus(x)


@dataclasses.dataclass
class DNCInterface:
    """One step's interface vector, split and squashed (the DNC paper's xi_t).

    read_keys [B, R, W], read_strengths [B, R] >= 1, write_key [B, 1, W], write_strength [B, 1] >= 1,
    erase [B, W] in [0, 1], write_vector [B, W], free_gates [B, R], allocation_gate [B, 1],
    write_gate [B, 1] in [0, 1], read_modes [B, R, 3] (backward, content, forward; sums to 1).
    """

    read_keys: Tensor
    read_strengths: Tensor
    write_key: Tensor
    write_strength: Tensor
    erase: Tensor
    write_vector: Tensor
    free_gates: Tensor
    allocation_gate: Tensor
    write_gate: Tensor
    read_modes: Tensor


@dataclasses.dataclass
class DNCState(DenseState):
    """memory [B, N, W], usage [B, N], link [B, N, N], precedence [B, N], and the last
    read_weights [B, R, N] and write_weights [B, N]. initial_memory: the rows reset() restores
    (None: zeros)."""

    memory: Tensor
    usage: Tensor
    link: Tensor
    precedence: Tensor
    read_weights: Tensor
    write_weights: Tensor
    initial_memory: Tensor | None = dataclasses.field(default=None, metadata={"constant": True})

    def fresh(self) -> "DNCState":
        zeros = {name: torch.zeros_like(getattr(self, name)) for name in self._recurrent_fields()}
        if self.initial_memory is not None:
            memory = self.initial_memory.expand_as(self.memory)
            zeros.update(memory=memory, usage=preloaded_usage(memory).to(self.usage.dtype))
        return DNCState(**zeros, initial_memory=self.initial_memory)


def preloaded_usage(memory: Tensor) -> Tensor:
    """The usage [B, N] of a preloaded memory [B, N, W]: 1 for a row holding anything, 0 for an
    all-zero row.

    A written row is in use: allocation leaves it alone until a read with a free gate releases
    it (the DNC's only way to give a row back), so a preloaded knowledge base is not overwritten
    by the first writes. An all-zero row is what a fresh memory holds and stays free for
    allocation: preload N' < N rows and pad with zeros to leave N - N' slots to write in
    (preloading zeros everywhere is the same as no preload)."""
    return (memory.detach() != 0).any(-1).to(memory.dtype)


class DNCMemory(Memory):
    """DNC memory of N slots of W with R read heads and one write head.

    Interface size R*W + 3W + 5R + 3 (read keys and strengths, write key and strength,
    erase, write vector, free gates, allocation and write gates, 3 read modes per head).
    """

    state_type = DNCState
    link_checkpoint_every: int | None = 4
    """The step loop's backward keeps the N x N link of every k-th step and rebuilds the others (see
    ops.link_update_reads): about T/k + k links for T steps instead of T + 1, for k - 1 link
    updates more per k steps. None keeps every link, in the step loop and in sm.DNC's one op (whose
    own interval otherwise follows sequence_link_bytes)."""
    link_checkpoint_bytes: int = 2**20
    """Links smaller than this (B N^2 values) are all kept, whatever link_checkpoint_every says: the
    memory saved is small and the chain's bookkeeping costs a small DNC 2-8% of a training step
    (N = 16-64, B = 32). 0: checkpoint at every size."""

    @property
    def interface_size(self) -> int:
        R, W = self.num_reads, self.word_size
        return R * W + 3 * W + 5 * R + 3

    def split_interface(self, interface: Tensor) -> DNCInterface:
        return DNCInterface(*split_interface_ref(interface, self.num_reads, self.word_size))

    def init_interface_bias(self, bias: Tensor) -> None:
        """Set the bias of the controller's interface layer (bias [interface_size], in place) so
        that training starts writing to free slots and keeping what it stored: allocation and
        write gates sigmoid(3) = 0.95, free gates sigmoid(-3) = 0.05, and read modes that leave
        out the backward link (softmax(-3, 0, 0): 0.02 backward, 0.49 content, 0.49 forward)
        instead of every gate at 0.5 and a third of each read going backwards.

        Why: at 0.5 half of each write is blended into the slots last written by content, and
        half of what was read is freed at every step, so early in training the items stored
        overwrite each other; with this start DNC associative recall (feed-forward controller,
        hidden 128) learned on seeds 0-4 where the Linear's own bias learned on 2 of them
        (bench/results/learning/README.md). Not sm.DNC's default: a stream longer than N needs
        the slots freed, and examples/memory_layer.py tags no better than a constant guess with
        it (`python -m sparsemem.train --interface-init new-slot` applies it)."""
        R, W = self.num_reads, self.word_size
        free = R * W + R + 3 * W + 1  # after read keys and strengths, write key and strength, erase, write vector
        with torch.no_grad():
            bias[free : free + R] = -3.0  # free gates
            bias[free + R : free + R + 2] = 3.0  # allocation gate, write gate
            bias[free + R + 2 :].view(R, 3).copy_(bias.new_tensor([-3.0, 0.0, 0.0]))  # (backward, content, forward)

    def init_state(
        self,
        batch_size: int,
        memory: Tensor | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> DNCState:
        """A fresh memory: zeros, nothing used, no links, no reads yet. A given memory
        [B, N, W] (or [N, W]) is the starting content; its rows that hold anything count as
        used (usage 1) and its all-zero rows as free (usage 0): see preloaded_usage."""
        B, N, R = batch_size, self.num_slots, self.num_reads
        initial = self.initial_memory(B, memory, device, dtype)
        if initial is not None:
            device, dtype = initial.device, initial.dtype
        dtype = dtype or torch.get_default_dtype()
        state = DNCState(
            memory=torch.zeros(B, N, self.word_size, device=device, dtype=dtype),
            usage=torch.zeros(B, N, device=device, dtype=dtype),
            link=torch.zeros(B, N, N, device=device, dtype=dtype),
            precedence=torch.zeros(B, N, device=device, dtype=dtype),
            read_weights=torch.zeros(B, R, N, device=device, dtype=dtype),
            write_weights=torch.zeros(B, N, device=device, dtype=dtype),
            initial_memory=initial,
        )
        return state if initial is None else state.fresh()

    sequence_link_bytes: int = 2**28
    """sm.DNC runs a sequence's steps as one op (ops.dnc_sequence: much faster at small N), whose
    backward keeps the N x N link of every step while those T links take at most this many bytes
    (256 MiB; links under link_checkpoint_bytes are kept whatever T is), and of every k-th step
    beyond that (see sequence_checkpoint_every)."""

    def sequence_checkpoint_every(self, state: DNCState, steps: int) -> int:
        """How many steps apart ops.dnc_sequence keeps the link for its backward over `steps` steps
        from `state` (it rebuilds the ones between): 1 (every link) where the links are small or
        link_checkpoint_every is None, else the smallest k whose links held at once, the T/k kept
        and k - 1 rebuilt, take at most sequence_link_bytes, or the k that holds the fewest (about
        sqrt(T)) when none does."""
        if self._checkpoint_every(state) is None:
            return 1
        link_bytes = state.link.numel() * state.link.element_size()

        def held(k: int) -> int:
            return -(-steps // k) + k - 1

        intervals = range(1, max(steps, 1) + 1)
        for k in intervals:
            if held(k) * link_bytes <= self.sequence_link_bytes:
                return k
        return min(intervals, key=held)

    def _checkpoint_every(self, state: DNCState) -> int | None:
        small = state.link.numel() * state.link.element_size() < self.link_checkpoint_bytes
        return None if small else self.link_checkpoint_every

    def step(self, state: DNCState, interface: DNCInterface, active: Tensor | None = None) -> tuple[Tensor, DNCState]:
        """One DNC step, in the paper's order: usage, allocation, write weights and write
        (ops.dnc_write), links and temporal weights (ops.link_update_reads), content and read
        weights and read (ops.dnc_read). -> (reads [B, R, W], state)."""
        memory, usage, write_weights, _, _ = ops.dnc_write(
            state.memory,
            state.usage,
            state.write_weights,
            state.read_weights,
            interface.free_gates,
            interface.write_key,
            interface.write_strength,
            interface.allocation_gate,
            interface.write_gate,
            interface.erase,
            interface.write_vector,
        )
        # A padded row (active False) writes nothing to the links: with w = 0, L' = L off the diagonal
        # (which is 0) and p' = p exactly, so the N x N links need no where below and stay a chain.
        link_writes = write_weights if active is None else torch.where(active.unsqueeze(-1), write_weights, 0)
        every = self._checkpoint_every(state)
        link, precedence, forward, backward = ops.link_update_reads(
            state.link, state.precedence, link_writes, state.read_weights, checkpoint_every=every
        )
        reads, read_weights, _ = ops.dnc_read(
            memory, interface.read_keys, interface.read_strengths, interface.read_modes, backward, forward
        )
        new_state = DNCState(
            memory=memory,
            usage=usage,
            link=link,
            precedence=precedence,
            read_weights=read_weights,
            write_weights=write_weights,
            initial_memory=state.initial_memory,
        )
        if active is None:
            return reads, new_state
        kept = {}
        for name in state._recurrent_fields():
            if name not in ("link", "precedence"):
                new, old = getattr(new_state, name), getattr(state, name)
                kept[name] = torch.where(active.view(-1, *[1] * (new.dim() - 1)), new, old)
        return reads, dataclasses.replace(new_state, **kept)
