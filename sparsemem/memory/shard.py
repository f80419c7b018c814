"""A sparse memory's slots split across the ranks of a torch.distributed process group (DESIGN.md,
"Past one machine"): which rank owns which slot, and the collectives a sharded step uses, each
with a timeout and counted (calls and bytes) for the benchmarks.

The split: N = q P + m slots over P ranks in contiguous ranges, in rank order; ranks 0 .. m-1
hold q + 1 slots, the others q (N = 10, P = 4: 3, 3, 2, 2). Rank order is then slot order, so a
merge that keeps the lower rank first among equal scores keeps the lower slot first, as the
unsharded model does.

Gradients. The ranks of a shard group run the same controller on the same inputs, so each computes
the same loss, and two autograd Functions (the f and g of Megatron-LM's tensor parallelism) give
every rank the unsharded model's gradients with no reduction of parameters afterwards:
  combine(x)    forward: the sum over the ranks (all_reduce); backward: the identity. Each rank
                gathers the rows it owns (zeros for the others'), the sum is the rows; the rows'
                gradient, the same on every rank, is each rank's part's.
  replicate(x)  forward: the identity; backward: the sum over the ranks (all_reduce). For what goes
                into the shards (the write's weights and add vector, an initial memory): each
                rank's backward sees only its own slots' part of their gradient.
"""

import datetime
from collections import Counter

import torch
import torch.distributed as dist
from torch import Tensor

DEFAULT_TIMEOUT = 300.0
"""Seconds a collective of a sharded step waits for the other ranks before it fails (a rank that
died or hangs): ShardGroup(timeout=...) changes it."""


class ShardGroupError(RuntimeError):
    """A collective over the shard group failed: a rank died, or did not reach it in time."""


class ShardGroup:
    """The ranks a memory of N slots is split over: `group` (a torch.distributed ProcessGroup, or
    torch.distributed.group.WORLD), this rank, P, and this rank's slots [start, stop).

    traffic counts what this rank sends to the collectives (bytes of its contributions, by
    collective, and calls): reset_traffic() starts a new count.
    """

    def __init__(self, group: object, num_slots: int, timeout: float = DEFAULT_TIMEOUT) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                "shard_group needs an initialised torch.distributed process group: call "
                "torch.distributed.init_process_group (torchrun sets its environment) before building the model"
            )
        if not isinstance(group, dist.ProcessGroup):
            raise ValueError(
                "shard_group must be a torch.distributed ProcessGroup (torch.distributed.new_group(ranks) or "
                f"torch.distributed.group.WORLD); got {type(group).__name__}"
            )
        if dist.get_rank(group) < 0:
            raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of shard_group")
        if not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds; got {timeout!r}")
        self.group = group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        if num_slots < self.size:
            raise ValueError(
                f"N={num_slots} slots cannot be split across P={self.size} ranks of shard_group: "
                "each rank needs at least one slot (N >= P)"
            )
        self.num_slots = num_slots
        quotient, remainder = divmod(num_slots, self.size)
        self.starts = [r * quotient + min(r, remainder) for r in range(self.size + 1)]
        self.start, self.stop = self.starts[self.rank], self.starts[self.rank + 1]
        self.timeout = datetime.timedelta(seconds=timeout)
        self.traffic: Counter[str] = Counter()

    @property
    def local_slots(self) -> int:
        """N_r: the slots this rank holds."""
        return self.stop - self.start

    @property
    def largest(self) -> int:
        """The most slots any rank holds (ceil(N / P))."""
        return self.starts[1] - self.starts[0]

    def owns(self, slots: Tensor) -> Tensor:
        """slots (global ids) -> bool, True where this rank holds the slot."""
        return (slots >= self.start) & (slots < self.stop)

    def local(self, slots: Tensor) -> tuple[Tensor, Tensor]:
        """slots (global ids) -> (owned bool, local ids: slot - start where owned, 0 elsewhere)."""
        owned = self.owns(slots)
        return owned, torch.where(owned, slots - self.start, 0)

    def reset_traffic(self) -> None:
        self.traffic.clear()

    # ----- collectives (each waited on with the timeout, counted, errors made readable)

    def _wait(self, name: str, work: object, tensor: Tensor) -> None:
        self.traffic[f"{name}_bytes"] += tensor.numel() * tensor.element_size()
        self.traffic[f"{name}_calls"] += 1
        try:
            work.wait(self.timeout)
        except RuntimeError as error:
            raise ShardGroupError(
                f"sharded memory: {name} over the shard group of P={self.size} ranks failed on rank {self.rank} "
                f"(a rank died, or did not reach it within {self.timeout.total_seconds():g} s): {error}"
            ) from error

    def sum(self, tensor: Tensor) -> Tensor:
        """The elementwise sum over the ranks (a new tensor; not differentiable: see combine)."""
        out = tensor.detach().clone()
        if self.size > 1:
            self._wait("all_reduce", dist.all_reduce(out, group=self.group, async_op=True), out)
        return out

    def gather(self, tensor: Tensor) -> Tensor:
        """Every rank's tensor (same shape on each), stacked in rank order: [P, ...] (no gradient)."""
        tensor = tensor.detach().contiguous()
        if self.size == 1:
            return tensor.unsqueeze(0)
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        self._wait("all_gather", dist.all_gather(parts, tensor, group=self.group, async_op=True), tensor)
        return torch.stack(parts)

    def check_same(self, what: str, sizes: dict[str, int]) -> None:
        """A ValueError on every rank unless every rank gives the same sizes (ints, by glossary letter)."""
        mine = torch.tensor(list(sizes.values()), dtype=torch.int64)
        every = self.gather(mine)
        differ = (every != mine).any(-1).nonzero().flatten().tolist()
        if differ:
            other = dict(zip(sizes, every[differ[0]].tolist(), strict=True))
            raise ValueError(
                f"every rank of shard_group must {what} alike: rank {self.rank} has "
                f"{', '.join(f'{k}={v}' for k, v in sizes.items())}; rank {differ[0]} has "
                f"{', '.join(f'{k}={v}' for k, v in other.items())}"
            )


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, shard: ShardGroup, part: Tensor) -> Tensor:
        return shard.sum(part)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return None, grad


class _Replicate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, shard: ShardGroup, value: Tensor) -> Tensor:
        ctx.shard = shard
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return None, ctx.shard.sum(grad)


def combine(shard: ShardGroup, part: Tensor) -> Tensor:
    """The sum of every rank's part (forward all_reduce, backward identity: see the module)."""
    return _Combine.apply(shard, part)


def replicate(shard: ShardGroup, value: Tensor) -> Tensor:
    """value itself; its gradient is summed over the ranks in backward (see the module)."""
    if not (torch.is_grad_enabled() and value.requires_grad) or shard.size == 1:
        return value
    return _Replicate.apply(shard, value)
