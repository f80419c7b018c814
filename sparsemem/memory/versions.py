"""Versions of one in-place storage: what makes a sparse memory's state a value (DESIGN.md,
"States are values").

A sparse memory's storage (its rows and their index, the LRU, SDNC's link rows) is changed in
place, O(K) rows a step; it is never copied. Each state names a Version of it: a node of a tree
whose edges are the Changes one step made, each kept with what it overwrote (to undo) and what
it wrote (to redo). Stepping from a state whose version is not the one the storage holds first
moves the storage there: undo up to the common ancestor, redo down to the state's version, so
O(rows changed on the way), never O(N) and never an index rebuild. A state whose version was
left behind is therefore still usable: going back to it is a rollback, going forward again a
redo. Nothing is recomputed.

What is kept is bounded by the oldest state still held: states hold their version through a
VersionRef the timeline tracks weakly, and the tree above the common ancestor of the held
versions (and the storage's own) is cut, so a stream that drops its old states keeps a bounded
number of steps.
"""

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol


class Change(Protocol):
    """One in-place change to the storage, already applied; undo() restores what it overwrote,
    redo() applies it again. rows: storage rows it touches (what a rollback costs)."""

    rows: int

    def undo(self) -> None: ...

    def redo(self) -> None: ...


class Version:
    """A node of the version tree: parent, depth, and the changes that lead from parent to it."""

    __slots__ = ("changes", "depth", "parent")

    def __init__(self, parent: "Version | None") -> None:
        self.parent = parent
        self.depth = 0 if parent is None else parent.depth + 1
        self.changes: list[Change] = []


class VersionRef:
    """A state's hold on its version: while it lives, the timeline keeps the way to the version."""

    __slots__ = ("__weakref__", "version")

    def __init__(self, version: Version) -> None:
        self.version = version


class Unreachable(ValueError):
    """A version whose way back was cut (no state held it when the tree was pruned)."""


COMPACT_EVERY = 64
"""Steps between prunings at least; the interval doubles with what the held states keep, so
pruning costs O(1) amortised per step even while an old state is held."""


class Timeline:
    """The version tree of one storage and the version the storage holds now (head)."""

    def __init__(self) -> None:
        self.head = Version(None)
        self._refs: weakref.WeakSet[VersionRef] = weakref.WeakSet()
        self._root_depth = 0
        self._next_prune = COMPACT_EVERY
        self.recording = True
        self.moving = False
        self._after_move: dict[int, Callable[[], None]] = {}
        self.rows_recorded = 0
        self.rows_undone = 0
        self.rows_redone = 0

    def hold(self, version: Version) -> VersionRef:
        """A ref for a new state naming `version`."""
        ref = VersionRef(version)
        self._refs.add(ref)
        return ref

    def record(self, change: Change) -> None:
        """A change just applied to the storage: part of the head version."""
        if not self.recording:
            return
        self.head.changes.append(change)
        self.rows_recorded += change.rows

    def branch(self, version: Version) -> Version:
        """Move the storage to `version` and start a new version after it (the next step's)."""
        self.checkout(version)
        self.head = Version(version)
        if self.head.depth - self._root_depth >= self._next_prune:
            self.prune()
        return self.head

    def checkout(self, version: Version) -> None:
        """Bring the storage to `version`: undo the changes up to the common ancestor with the
        head, redo those down to `version`."""
        if version is self.head:
            return
        undo, redo = [], []
        here, there = self.head, version
        while here is not there:
            if here is None or there is None:
                raise Unreachable(
                    "this state's memory version can no longer be reached: it was pruned when no "
                    "state held it; keep a reference to the state (or clone() it) to come back to it"
                )
            if here.depth >= there.depth:
                undo.append(here)
                here = here.parent
            else:
                redo.append(there)
                there = there.parent
        self.moving = True
        try:
            for node in undo:
                for change in reversed(node.changes):
                    change.undo()
                    self.rows_undone += change.rows
            for node in reversed(redo):
                for change in node.changes:
                    change.redo()
                    self.rows_redone += change.rows
        finally:
            self.moving = False
            syncs, self._after_move = list(self._after_move.values()), {}
        for sync in syncs:
            sync()
        self.head = version

    def after_move(self, owner: object, sync: Callable[[], None]) -> None:
        """During a checkout: run sync() once when every change has been undone or redone (a store
        brings its index up to date once for all the rows the move touched, not once a step)."""
        self._after_move.setdefault(id(owner), sync)

    def prune(self) -> None:
        """Cut the tree above the common ancestor of the held versions and the head."""
        root = self.head
        for ref in list(self._refs):
            root = _common_ancestor(root, ref.version)
        if root is None:  # a held version already unreachable: nothing to cut
            return
        root.parent = None
        root.changes = []
        self._root_depth = root.depth
        self._next_prune = max(COMPACT_EVERY, 2 * (self.head.depth - root.depth))

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Changes made inside are not recorded (a CUDA graph capture: replays run no Python)."""
        self.recording = False
        try:
            yield
        finally:
            self.recording = True

    def seal(self) -> None:
        """Make the head the root: nothing before it can be reached again."""
        self.head.parent = None
        self.head.changes = []
        self._root_depth = self.head.depth

    def retained(self) -> tuple[int, int]:
        """(versions, rows) kept for going back: the nodes between the held versions and the root."""
        seen: set[int] = set()
        rows = 0
        for start in [self.head, *(ref.version for ref in list(self._refs))]:
            node = start
            while node is not None and id(node) not in seen:
                seen.add(id(node))
                rows += sum(change.rows for change in node.changes)
                node = node.parent
        return len(seen), rows


def _common_ancestor(a: Version | None, b: Version | None) -> Version | None:
    while a is not b:
        if a is None or b is None:
            return None
        if a.depth >= b.depth:
            a = a.parent
        else:
            b = b.parent
    return a
