"""Ablations for the learning tests: a memory whose reads never reach the controller.

With a feed-forward controller the ablated model's output at a query depends on that step's
input alone, which says nothing of the value asked for: no budget takes it below chance, so the
recall tests' ablations run a short budget. With an LSTM controller the ablation is an LSTM
alone, which may learn a task given steps enough: its budget is the memory model's."""

from torch import Tensor

from sparsemem.memory import Memory


class ZeroReads(Memory):
    """Wraps a memory and returns zero reads: the model is its controller alone, with the
    same parameters and interface, so a task it still learns did not need the memory."""

    def __init__(self, memory: Memory) -> None:
        super().__init__(memory.num_slots, memory.word_size, memory.num_reads)
        self.inner = memory

    @property
    def interface_size(self) -> int:
        return self.inner.interface_size

    def split_interface(self, interface: Tensor) -> Tensor:
        return interface  # nothing reads it: step below does not step the memory

    def init_state(self, batch_size, memory=None, device=None, dtype=None):
        return self.inner.init_state(batch_size, memory, device, dtype)

    def check_state(self, state) -> None:
        self.inner.check_state(state)

    def step(self, state, interface, active=None) -> tuple[Tensor, object]:
        # The memory's state never reaches the outputs, so it is not stepped: the model trains
        # exactly as with the memory stepped and its reads zeroed, at the controller's cost.
        return interface.new_zeros(interface.shape[0], self.num_reads, self.word_size), state
