"""Data-parallel training over torch.distributed: the process group that torchrun describes, and
the few collectives the training loop needs so that every rank decides alike.

    torchrun --standalone --nproc-per-node 2 -m sparsemem.train --model dnc --task copy

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in each process it
starts; `join` reads them through torch.distributed.init_process_group (gloo on the CPU, nccl on
CUDA). A process started without them, or as the only one, is a plain single-process run: no
process group, no DistributedDataParallel, nothing changes.
"""

import dataclasses
import datetime
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

DEFAULT_TIMEOUT = 600.0
"""Seconds a rank waits for the others at a collective before the run stops (a rank that died or
hangs). It must outlast the longest time a rank can spend alone: rank 0 writing a checkpoint, a
slow start on another node."""


def launched_world_size() -> int:
    """The number of processes torchrun started for this run (WORLD_SIZE), 1 without torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """This process's rank in torchrun's run (RANK), 0 without torchrun."""
    return int(os.environ.get("RANK", "0"))


@dataclasses.dataclass(frozen=True)
class World:
    """The ranks training together: rank, size (P). A World of size 1 is a single process: every
    method below is then the identity and calls no collective."""

    rank: int = 0
    size: int = 1

    @classmethod
    def current(cls) -> "World":
        """The default process group's ranks if one of more than one process is initialised."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def writes(self) -> bool:
        """Whether this rank writes the run's files (rank 0 does; the others write nothing)."""
        return self.rank == 0

    def rows(self, size: int) -> slice:
        """This rank's rows of a global batch of `size` rows: r::P."""
        return slice(self.rank, size, self.size)

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to train: DistributedDataParallel over `model` (which stays the one whose
        state_dict is saved), or `model` itself in a single process."""
        if not self.distributed:
            return model
        device = next(model.parameters()).device
        # Every rank builds the model from the same seed and the models hold no running statistics
        # (SAM's buffer is a constant): no buffer broadcast before each forward.
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False
        )

    def sum(self, tensor: Tensor) -> Tensor:
        """The elementwise sum over the ranks (a new tensor)."""
        return self._reduce(tensor, dist.ReduceOp.SUM)

    def max(self, tensor: Tensor) -> Tensor:
        """The elementwise maximum over the ranks (a new tensor)."""
        return self._reduce(tensor, dist.ReduceOp.MAX)

    def _reduce(self, tensor: Tensor, op: Any) -> Tensor:
        tensor = tensor.clone()
        if self.distributed:
            dist.all_reduce(tensor, op)
        return tensor

    def barrier(self) -> None:
        """Wait until every rank is here."""
        if self.distributed:
            dist.barrier()

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's `value` (picklable), in rank order, on rank 0; None on the others."""
        if not self.distributed:
            return [value]
        gathered = [None] * self.size if self.writes else None
        dist.gather_object(value, gathered, dst=0)
        return gathered


def join(device: str, timeout: float = DEFAULT_TIMEOUT) -> World:
    """Join the process group torchrun describes when it started more than one process (gloo for
    a CPU --device, nccl for CUDA, each rank on cuda:LOCAL_RANK), with `timeout` seconds on every
    collective. -> the World (size 1, nothing joined, without torchrun)."""
    if launched_world_size() <= 1:
        return World()
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout))
    return World.current()


def leave() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
