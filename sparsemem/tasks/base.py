"""What every algorithmic task shares: the batch, the loss and bits-error metric, the curriculum.

A task draws a whole batch at one difficulty `level` (a sequence length, a number of
items), so a batch needs no padding; `mask` marks the time steps whose outputs are scored.
"""

import dataclasses
import math
from abc import ABC, abstractmethod
from collections import deque

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclasses.dataclass
class Batch:
    """inputs [B, T, input_size], targets [B, T, output_size] in {0, 1}, mask [B, T] bool:
    the steps where the model must answer (the loss and the error count only those)."""

    inputs: Tensor
    targets: Tensor
    mask: Tensor

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.inputs.to(device), self.targets.to(device), self.mask.to(device))


class Task(ABC):
    """A seeded generator of batches at a difficulty level in [min_level, max_level]."""

    name: str
    input_size: int
    output_size: int
    min_level: int
    max_level: int

    def __init__(self, min_level: int, max_level: int) -> None:
        if not 1 <= min_level <= max_level:
            raise ValueError(f"{type(self).__name__} needs 1 <= min_level <= max_level; got {min_level}, {max_level}")
        self.min_level = min_level
        self.max_level = max_level

    @abstractmethod
    def sample(self, batch_size: int, level: int, generator: torch.Generator) -> Batch:
        """B sequences at difficulty `level`, drawn from `generator` only (so a seed fixes them)."""

    def eval_levels(self) -> list[int]:
        """The levels a trained model is evaluated at (all of them, unless a task has too many)."""
        return list(range(self.min_level, self.max_level + 1))

    def _check_level(self, level: int) -> None:
        if not self.min_level <= level <= self.max_level:
            raise ValueError(f"level must be in [{self.min_level}, {self.max_level}] for {self.name}; got {level}")


def random_bits(batch_size: int, length: int, bits: int, generator: torch.Generator) -> Tensor:
    """[B, length, bits] of independent fair coin flips, as 0.0 / 1.0."""
    return torch.randint(0, 2, (batch_size, length, bits), generator=generator).float()


def sequence_loss(logits: Tensor, batch: Batch) -> Tensor:
    """Binary cross-entropy averaged over the scored bits (the papers' cost, per bit, so one
    learning rate suits every sequence length)."""
    scored = batch.mask.unsqueeze(-1).expand_as(logits)
    return F.binary_cross_entropy_with_logits(logits[scored], batch.targets[scored])


def bits_in_error(logits: Tensor, batch: Batch) -> Tensor:
    """Bits in error per sequence, averaged over the batch: output bits thresholded at 1/2
    (logit 0) that differ from the target, on the scored steps (the NTM/DNC papers' metric)."""
    wrong = ((logits > 0) != (batch.targets > 0.5)) & batch.mask.unsqueeze(-1)
    return wrong.sum(dim=(1, 2)).float().mean()


class Curriculum:
    """Difficulty that grows as the model masters it.

    Each batch's level is drawn uniformly from [min_level, level], so earlier levels stay
    rehearsed; with top_share > 0 that share of the batches is drawn at the top level instead
    (the "mixed" curriculum of Zaremba and Sutskever 2014: the level being learnt gets the
    updates and its mastery is seen sooner, where a uniform draw over 1-8 spends 1/8 of them on
    it). Once the mean bits error of the last `window` batches drawn at the top level is below
    `threshold`, the top level goes up by one (times `growth` when that is more: a curriculum
    over 8 to 128 items then takes 4 stages, not 120); at max_level `mastered` turns True.
    enabled=False: the top level is max_level from the start. A curriculum pays where the long
    levels cannot be learnt from scratch; on short ones it only costs steps
    (bench/results/learning/README.md, "Curriculum").
    """

    def __init__(
        self,
        min_level: int,
        max_level: int,
        threshold: float = 0.1,
        window: int = 20,
        enabled: bool = True,
        growth: float = 1.0,
        top_share: float = 0.0,
    ) -> None:
        if not growth >= 1:
            raise ValueError(f"growth must be a number >= 1; got {growth}")
        if not 0 <= top_share <= 1:
            raise ValueError(f"top_share must be a number in [0, 1]; got {top_share}")
        self.min_level = min_level
        self.max_level = max_level
        self.threshold = threshold
        self.window = window
        self.growth = growth
        self.top_share = top_share
        self.level = min_level if enabled else max_level
        self.errors: deque[float] = deque(maxlen=window)

    def draw(self, generator: torch.Generator) -> int:
        # top_share 0 draws nothing more: the same levels as before it existed, for a resume
        if self.top_share > 0 and float(torch.rand((), generator=generator)) < self.top_share:
            return self.level
        return int(torch.randint(self.min_level, self.level + 1, (), generator=generator))

    def update(self, level: int, bits_error: float) -> None:
        """Record a batch's bits error per sequence at `level`; maybe raise the top level."""
        if level != self.level:
            return
        self.errors.append(bits_error)
        if len(self.errors) == self.window and self.mean_error < self.threshold and self.level < self.max_level:
            self.level = min(self.max_level, max(self.level + 1, math.ceil(self.level * self.growth)))
            self.errors.clear()

    @property
    def mean_error(self) -> float:
        return sum(self.errors) / len(self.errors) if self.errors else float("inf")

    @property
    def mastered(self) -> bool:
        full = len(self.errors) == self.window
        return self.level == self.max_level and full and self.mean_error < self.threshold

    def state_dict(self) -> dict:
        return {"level": self.level, "errors": list(self.errors)}

    def load_state_dict(self, state: dict) -> None:
        self.level = int(state["level"])
        self.errors = deque((float(e) for e in state["errors"]), maxlen=self.window)
