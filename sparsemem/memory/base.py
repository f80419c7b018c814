"""The interface every memory module implements, and the state base class the dense ones share.

A memory module is what sparsemem.models.MemoryModel plugs between a controller and
its output layer. Each time step the model projects the controller output h_t to
`interface_size` features, and the memory turns them into reads:

    interface = memory.split_interface(projection)   # split, squash: gates in [0, 1], ...
    reads, state = memory.step(state, interface)     # reads [B, R, W]

A new memory type (SAM, SDNC, ...) subclasses Memory and implements the four
members below; it gets the recurrent loop, the controller, read-vector feedback,
the output layer and input validation of MemoryModel for free.
"""

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

StateT = TypeVar("StateT", bound="DenseState")


def check_mask(mask: object, batch_size: int) -> Tensor:
    """The reset mask as given, or a ValueError that says what it must be: bool [B]."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != (batch_size,):
        got = f"{mask.dtype} {list(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a bool tensor [B] with B={batch_size}; got {got}")
    return mask


@dataclasses.dataclass
class DenseState:
    """Base of a dense memory's state: a dataclass of tensors whose first dimension is B.

    detach() and reset(mask) work field by field; a subclass only says what a freshly
    initialised state holds (fresh()). Fields with metadata {"constant": True} (e.g. the
    preloaded initial memory, which may be a trained parameter) are left alone by both.
    """

    def fresh(self: StateT) -> StateT:
        """A state of the same shapes holding what init_state would give."""
        raise NotImplementedError

    @property
    def batch_size(self) -> int:
        return self.memory.shape[0]

    def _recurrent_fields(self) -> list[str]:
        return [
            f.name
            for f in dataclasses.fields(self)
            if not f.metadata.get("constant") and isinstance(getattr(self, f.name), Tensor)
        ]

    def detach(self: StateT) -> StateT:
        """The same values cut from the autograd graph (truncated BPTT)."""
        return dataclasses.replace(self, **{name: getattr(self, name).detach() for name in self._recurrent_fields()})

    def clone(self: StateT) -> StateT:
        """An independent copy (tensors cloned: gradients still flow through it)."""
        return dataclasses.replace(self, **{name: getattr(self, name).clone() for name in self._recurrent_fields()})

    def where(self: StateT, active: Tensor, other: StateT) -> StateT:
        """This state in the batch rows where active [B] is True, `other` elsewhere (padding)."""
        changed = {}
        for name in self._recurrent_fields():
            value = getattr(self, name)
            changed[name] = torch.where(active.view(-1, *([1] * (value.dim() - 1))), value, getattr(other, name))
        return dataclasses.replace(self, **changed)

    def reset(self: StateT, mask: Tensor) -> StateT:
        """A state where the batch rows with mask[B] True start afresh and the others carry on."""
        mask = check_mask(mask, self.batch_size)
        fresh = self.fresh()
        changed = {}
        for name in self._recurrent_fields():
            value = getattr(self, name)
            rows = mask.view(-1, *([1] * (value.dim() - 1)))
            changed[name] = torch.where(rows, getattr(fresh, name), value)
        return dataclasses.replace(self, **changed)


class Memory(nn.Module, ABC):
    """A memory access module: N slots of W, R read heads, driven by a controller.

    Implement:
      interface_size           features of the controller projection one step consumes.
      split_interface(x)       x [B, interface_size] -> this memory's interface (any object:
                               a dataclass of squashed tensors), e.g. keys [B, R, W].
      init_state(B, memory=None, device=None, dtype=None)
                               the state of a fresh memory; memory [B, N, W] (or [N, W],
                               shared by the batch) starts from given rows.
      step(state, interface, active=None)
                               one time step -> (reads [B, R, W], new state); batch rows
                               where active [B] is False (padding) change nothing.
    The state must offer detach(), reset(mask [B] bool) (both returning the new state),
    batch_size, and the attributes memory, read_weights and write_weights (for plots).
    """

    state_type: type
    """The class of this memory's states (check_state refuses any other; optional)."""

    def __init__(self, num_slots: int, word_size: int, num_reads: int) -> None:
        super().__init__()
        for name, value in (("num_slots", num_slots), ("word_size", word_size), ("num_reads", num_reads)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        self.num_slots = num_slots
        self.word_size = word_size
        self.num_reads = num_reads

    @property
    @abstractmethod
    def interface_size(self) -> int: ...

    @abstractmethod
    def split_interface(self, interface: Tensor) -> Any: ...

    @abstractmethod
    def init_state(
        self,
        batch_size: int,
        memory: Tensor | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Any: ...

    @abstractmethod
    def step(self, state: Any, interface: Any, active: Tensor | None = None) -> tuple[Tensor, Any]:
        """One time step -> (reads [B, R, W], new state). active [B] bool (padded batches): rows
        where it is False write nothing (memory, usage, links, index) and keep their state."""

    def state_sizes(self) -> dict[str, int]:
        """The sizes a state of this memory has, by glossary letter (check_state compares them)."""
        return {"N": self.num_slots, "W": self.word_size, "R": self.num_reads}

    def sizes_of(self, state: Any) -> dict[str, int]:
        """The sizes of a state of this memory's type (dense: memory [B, N, W], read_weights [B, R, N])."""
        return {"N": state.memory.shape[1], "W": state.memory.shape[2], "R": state.read_weights.shape[1]}

    def check_state(self, state: Any) -> None:
        """A ValueError unless `state` is this memory's type of state with its sizes."""
        kind = getattr(self, "state_type", None)
        if kind is None:  # a memory that does not declare its state class is not checked
            return
        if type(state) is not kind:
            raise ValueError(
                f"state holds a {type(state).__name__}, but this model's memory takes a {kind.__name__}; "
                "start one with model.init_state(B)"
            )
        got, want = self.sizes_of(state), self.state_sizes()
        if got != want:
            show = ", ".join
            raise ValueError(
                f"state is for {show(f'{k}={v}' for k, v in got.items())} but this model has "
                f"{show(f'{k}={v}' for k, v in want.items())}; start one with model.init_state(B)"
            )

    def initial_memory(
        self, batch_size: int, memory: Tensor | None, device: torch.device | str | None, dtype: torch.dtype | None
    ) -> Tensor | None:
        """A given initial memory as [B, N, W] (an [N, W] one is shared by the batch), or None."""
        if memory is None:
            return None
        N, W = self.num_slots, self.word_size
        if not isinstance(memory, Tensor) or memory.shape not in ((batch_size, N, W), (N, W)):
            got = list(memory.shape) if isinstance(memory, Tensor) else type(memory).__name__
            raise ValueError(f"memory must be [B, N, W] = [{batch_size}, {N}, {W}] or [N, W]; got {got}")
        if not memory.is_floating_point():
            raise ValueError(f"memory must be a floating-point tensor; got {memory.dtype}")
        memory = memory.to(device=device or memory.device, dtype=dtype or memory.dtype)
        return memory.expand(batch_size, N, W)

    def extra_repr(self) -> str:
        return f"N={self.num_slots}, W={self.word_size}, R={self.num_reads}"
