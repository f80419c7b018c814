"""Algorithmic tasks with seeded batch generators, a curriculum over difficulty, and the
papers' metric (bits in error per sequence); `babi`: the bAbI question-answering tasks, read from
the release the user names."""

from sparsemem.tasks import babi
from sparsemem.tasks.algorithmic import AssociativeRecall, Copy, KeyValueRecall, PrioritySort, RepeatCopy
from sparsemem.tasks.base import Batch, Curriculum, Task, bits_in_error, sequence_loss

TASKS: dict[str, type[Task]] = {
    task.name: task for task in (Copy, RepeatCopy, AssociativeRecall, PrioritySort, KeyValueRecall)
}
"""The tasks by their command-line name."""

__all__ = [
    "TASKS",
    "AssociativeRecall",
    "Batch",
    "Copy",
    "Curriculum",
    "KeyValueRecall",
    "PrioritySort",
    "RepeatCopy",
    "Task",
    "babi",
    "bits_in_error",
    "sequence_loss",
]
