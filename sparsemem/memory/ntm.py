"""NTMMemory: the Neural Turing Machine's memory (Graves et al. 2014).

R read heads and one or more write heads, each addressed by content, interpolation with
its previous weights, a circular shift over S offsets and sharpening (ops.ntm_address).
The write comes first, so a step's reads see what it wrote (as in the DNC).
"""

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsemem import ops
from sparsemem.memory.base import DenseState, Memory
from sparsemem.memory.dnc import oneplus

INITIAL_WORD = 1e-6
"""Every slot of a fresh NTM memory holds this constant: the initialisation Collier and
Beel (2018) found to learn fastest, and nonzero so content addressing starts defined."""


@dataclasses.dataclass
class HeadInterface:
    """Addressing of H heads: key [B, H, W], strength [B, H] >= 0, gate [B, H] in [0, 1],
    shift [B, H, S] (a distribution over offsets -S//2 .. S//2), sharpen [B, H] >= 1."""

    key: Tensor
    strength: Tensor
    gate: Tensor
    shift: Tensor
    sharpen: Tensor


@dataclasses.dataclass
class NTMInterface:
    """read: the R read heads; write: the write heads (H = num_writes); erase [B, H, W] in [0, 1];
    add [B, H, W]."""

    read: HeadInterface
    write: HeadInterface
    erase: Tensor
    add: Tensor


@dataclasses.dataclass
class NTMState(DenseState):
    """memory [B, N, W], read_weights [B, R, N], write_weights [B, num_writes, N]. initial_memory:
    the rows reset() restores (None: every slot INITIAL_WORD)."""

    memory: Tensor
    read_weights: Tensor
    write_weights: Tensor
    initial_memory: Tensor | None = dataclasses.field(default=None, metadata={"constant": True})

    def fresh(self) -> "NTMState":
        # Heads start focused on slot 0, so shifts alone can walk the memory.
        read_weights = torch.zeros_like(self.read_weights)
        read_weights[..., 0] = 1
        write_weights = torch.zeros_like(self.write_weights)
        write_weights[..., 0] = 1
        if self.initial_memory is None:
            memory = torch.full_like(self.memory, INITIAL_WORD)
        else:
            memory = self.initial_memory.expand_as(self.memory)
        return NTMState(memory, read_weights, write_weights, self.initial_memory)


class NTMMemory(Memory):
    """NTM memory of N slots of W with R read heads, num_writes write heads and shifts over S offsets.

    Interface size (R + num_writes)*(W + S + 3) + num_writes*2W: per head a key, strength, gate,
    S shift logits and sharpening; per write head also erase and add vectors.

    Several write heads (the NTM paper's priority sort used 8) write at once: each erases
    multiplicatively and the adds sum, M (prod_h (1 - w_h e_h^T)) + sum_h w_h a_h^T, so their
    order does not matter (Graves et al. 2014, section 3.2).
    """

    state_type = NTMState

    def __init__(
        self, num_slots: int, word_size: int, num_reads: int = 1, shift_range: int = 3, num_writes: int = 1
    ) -> None:
        super().__init__(num_slots, word_size, num_reads)
        if shift_range < 1 or shift_range % 2 == 0 or shift_range > num_slots:
            raise ValueError(f"shift_range S must be odd and in [1, N={num_slots}]; got {shift_range}")
        if not isinstance(num_writes, int) or num_writes < 1:
            raise ValueError(f"num_writes must be a positive int; got {num_writes!r}")
        self.shift_range = shift_range
        self.num_writes = num_writes

    @property
    def interface_size(self) -> int:
        head = self.word_size + self.shift_range + 3
        return (self.num_reads + self.num_writes) * head + self.num_writes * 2 * self.word_size

    def _heads(self, x: Tensor, heads: int) -> HeadInterface:
        B, W, S = x.shape[0], self.word_size, self.shift_range
        key, strength, gate, shift, sharpen = x.view(B, heads, -1).split([W, 1, 1, S, 1], dim=-1)
        return HeadInterface(
            key=key,
            strength=F.softplus(strength[..., 0]),
            gate=torch.sigmoid(gate[..., 0]),
            shift=torch.softmax(shift, dim=-1),
            sharpen=oneplus(sharpen[..., 0]),
        )

    def init_interface_bias(self, bias: Tensor) -> None:
        """Set the bias of the controller's interface layer (bias [interface_size], in place) so
        that training starts with every write head moving one slot on at every step: its gate
        sigmoid(-3) = 0.05 (keep the last location rather than look up by content), the +1 shift
        at softmax 0.91 and sharpening oneplus(3) = 4.05; the read heads keep the Linear's init.

        Why: each item stored lands in a slot of its own, in order, which copy and associative
        recall build on (find an item by content, shift one on to the next). With it the NTM
        learned associative recall (feed-forward controller, hidden 64) on seeds 0-4 where the
        Linear's own bias learned none in 3 minutes (bench/results/learning/README.md)."""
        R, W, S = self.num_reads, self.word_size, self.shift_range
        if S < 3:
            raise ValueError(f"the write head cannot move one slot on with shift_range S={S}: it needs S >= 3")
        H = self.num_writes
        with torch.no_grad():  # the write heads follow the read heads: key W, strength, gate, S shifts, sharpening
            write = bias[R * (W + S + 3) : (R + H) * (W + S + 3)].view(H, W + S + 3)
            write[:, W + 1] = -3.0  # gate
            write[:, W + 2 : W + 2 + S] = 0.0
            write[:, W + 2 + S // 2 + 1] = 3.0  # the +1 shift
            write[:, W + 2 + S] = 3.0  # sharpening

    def split_interface(self, interface: Tensor) -> NTMInterface:
        R, H, W, S = self.num_reads, self.num_writes, self.word_size, self.shift_range
        read, write, erase, add = interface.split([R * (W + S + 3), H * (W + S + 3), H * W, H * W], dim=-1)
        B = interface.shape[0]
        return NTMInterface(
            self._heads(read, R), self._heads(write, H), torch.sigmoid(erase).view(B, H, W), add.view(B, H, W)
        )

    def init_state(
        self,
        batch_size: int,
        memory: Tensor | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> NTMState:
        """A fresh memory (every slot INITIAL_WORD, or the given [B, N, W] / [N, W] rows), heads on slot 0."""
        B, N = batch_size, self.num_slots
        initial = self.initial_memory(B, memory, device, dtype)
        if initial is not None:
            device, dtype = initial.device, initial.dtype
        dtype = dtype or torch.get_default_dtype()
        empty = NTMState(
            memory=torch.empty(B, N, self.word_size, device=device, dtype=dtype),
            read_weights=torch.empty(B, self.num_reads, N, device=device, dtype=dtype),
            write_weights=torch.empty(B, self.num_writes, N, device=device, dtype=dtype),
            initial_memory=initial,
        )
        return empty.fresh()

    def step(self, state: NTMState, interface: NTMInterface, active: Tensor | None = None) -> tuple[Tensor, NTMState]:
        """Address and write with the write heads, then address and read with the R read heads."""
        write = interface.write
        write_weights = ops.ntm_address(
            state.memory, write.key, write.strength, write.gate, write.shift, write.sharpen, state.write_weights
        )
        memory = self._write(state.memory, write_weights, interface.erase, interface.add)
        read = interface.read
        read_weights = ops.ntm_address(
            memory, read.key, read.strength, read.gate, read.shift, read.sharpen, state.read_weights
        )
        reads = ops.memory_read(memory, read_weights)
        new_state = NTMState(memory, read_weights, write_weights, state.initial_memory)
        return reads, new_state if active is None else new_state.where(active, state)

    @staticmethod
    def _write(memory: Tensor, write_w: Tensor, erase: Tensor, add: Tensor) -> Tensor:
        """M (prod_h (1 - w_h e_h^T)) + sum_h w_h a_h^T: memory [B, N, W], write_w [B, H, N],
        erase and add [B, H, W]. One head is ops.memory_write's fused op."""
        if write_w.shape[1] == 1:
            return ops.memory_write(memory, write_w[:, 0], erase[:, 0], add[:, 0])
        retain = (1 - write_w.unsqueeze(-1) * erase.unsqueeze(-2)).prod(dim=1)
        return memory * retain + torch.einsum("bhn,bhw->bnw", write_w, add)

    def extra_repr(self) -> str:
        writes = f", num_writes={self.num_writes}" if self.num_writes > 1 else ""
        return f"{super().extra_repr()}, S={self.shift_range}{writes}"
