"""Input validation at the public boundary, with errors named in glossary letters.

Shape, dtype and device checks always run. Value checks (NaN, out-of-range indices) need a
device sync, so on the GPU they run only with SPARSEMEM_DEBUG=1, and never inside torch.compile.

Sizes: B may be 0 (the ops then return empty outputs and gradients without running a kernel,
sparsemem.ops._define); every other letter in POSITIVE must be at least 1, and an int argument k
must be an int of at least 1 (check_k).
"""

import math
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

POSITIVE = frozenset({"N", "W", "R", "K", "K_L", "S", "J", "F", "G", "Q"})
"""The letters that must be at least 1: the glossary's sizes but B, and the ops' counts of gathered
rows (J written, F and G link rows, Q read slots). M (entries of an index update) may be 0."""


def debug() -> bool:
    return os.environ.get("SPARSEMEM_DEBUG") == "1"


class Shapes:
    """Checks a call's tensors against glossary shapes, binding each letter on first sight.

    >>> Shapes().check("memory", memory, "B N W").check("keys", keys, "B R W")
    """

    def __init__(self) -> None:
        self.sizes: dict[str, tuple[int, str]] = {}
        self.float_dtype: tuple[torch.dtype, str] | None = None
        self.device: tuple[torch.device, str] | None = None

    def check(self, name: str, tensor: object, dims: str, kind: str = "float") -> "Shapes":
        """kind: "float" (any floating dtype, the same for all float tensors), "index" (int64), "bool"."""
        letters = dims.split()
        if not isinstance(tensor, Tensor):
            raise ValueError(f"{name} must be a tensor {_expected(letters)}; got {type(tensor).__name__}")
        shape = tensor.shape
        if len(shape) != len(letters):
            raise ValueError(f"{name} must be {_expected(letters)}; got {list(shape)}")
        sizes = self.sizes
        for letter, size in zip(letters, shape, strict=True):
            if letter.isdigit():  # a fixed size, e.g. "B R 3"
                if size != int(letter):
                    raise ValueError(f"{name} must be {_expected(letters)}; got {list(shape)}")
                continue
            bound = sizes.get(letter)
            if bound is None:
                if size == 0 and letter in POSITIVE:
                    raise ValueError(f"{name} must be {_expected(letters)} with {letter} >= 1; got {list(shape)}")
                sizes[letter] = (size, name)
            elif bound[0] != size:
                raise ValueError(
                    f"{name} must be {_expected(letters)} with {letter}={bound[0]} (from {bound[1]}); got {list(shape)}"
                )
        self._check_dtype(name, tensor, kind)
        if self.device is None:
            self.device = (tensor.device, name)
        elif tensor.device != self.device[0]:
            raise ValueError(
                f"{name} is on {tensor.device} but {self.device[1]} is on {self.device[0]}; "
                "put all inputs on one device"
            )
        return self

    def _check_dtype(self, name: str, tensor: Tensor, kind: str) -> None:
        if kind == "index":
            if tensor.dtype != torch.int64:
                raise ValueError(f"{name} must be int64 indices; got {tensor.dtype}")
        elif kind == "bool":
            if tensor.dtype != torch.bool:
                raise ValueError(f"{name} must be a bool mask; got {tensor.dtype}")
        elif not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor; got {tensor.dtype}")
        elif self.float_dtype is None:
            self.float_dtype = (tensor.dtype, name)
        elif tensor.dtype != self.float_dtype[0]:
            raise ValueError(
                f"{name} is {tensor.dtype} but {self.float_dtype[1]} is {self.float_dtype[0]}; use one dtype"
            )

    def size(self, letter: str) -> int:
        return self.sizes[letter][0]


def check_k(k: object, num_slots: int | None = None) -> None:
    """ValueError unless k (K, slots per head) is an int, at least 1 and, given N, at most N."""
    if isinstance(k, bool) or not isinstance(k, (int, torch.SymInt)):
        raise ValueError(f"k must be an int (K, slots per head); got k={k!r} of type {type(k).__name__}")
    if num_slots is None:
        if k < 1:
            raise ValueError(f"k must be a positive int; got k={k}")
    elif not 1 <= k <= num_slots:
        raise ValueError(f"k must be in [1, N={num_slots}]; got k={k}")


def on_host(device: torch.device | str) -> bool:
    """Whether code for tensors on `device` may read their values on the host: the CPU may;
    on a GPU every read (.item(), .tolist(), nonzero, unique, a host copy) is a sync, so the
    sparse memory and its index take a device path that never reads. Tests patch this to run
    the device path on the CPU."""
    return torch.device(device).type == "cpu"


def _expected(letters: list[str]) -> str:
    return f"[{', '.join(letters)}]"


_trust = threading.local()


@contextmanager
def inputs_checked() -> Iterator[None]:
    """Inside, value checks run only with SPARSEMEM_DEBUG=1: the caller has checked the values
    everything inside derives from (a model's forward checks its input x once, so its steps do
    not sync on an aminmax per op per step). Shape, dtype and device checks still run.
    SPARSEMEM_DEBUG is read once, on entry: the ops inside ask per call, a dozen times a step."""
    outer = getattr(_trust, "depth", 0), getattr(_trust, "debug", False)
    _trust.depth, _trust.debug = outer[0] + 1, debug()
    try:
        yield
    finally:
        _trust.depth, _trust.debug = outer


def _debugging() -> bool:
    """debug(), as read on entering inputs_checked when inside it."""
    return _trust.debug if getattr(_trust, "depth", 0) else debug()


def _values_checked(tensor: Tensor) -> bool:
    trusted = getattr(_trust, "depth", 0)
    if trusted and not _trust.debug:  # inside a model's forward, the common case: nothing to read
        return False
    # Inside torch.compile a value check would be a data-dependent graph break: eager mode checks.
    if tensor.numel() == 0 or torch.compiler.is_compiling():
        return False
    return bool(trusted) or debug() or tensor.device.type == "cpu"


def _extremes(tensor: Tensor) -> tuple[float, float]:
    # One reduction and two scalars: NaN propagates into both, inf shows in one, so the pair says
    # whether every value is finite and in range (isfinite().all() costs three times as much).
    low, high = torch.aminmax(tensor.detach())
    return low.item(), high.item()


def check_finite(name: str, tensor: Tensor, state: bool = False) -> None:
    """ValueError if `tensor` holds NaN or inf (on the GPU only with SPARSEMEM_DEBUG=1).

    state=True marks a large state tensor (memory, links) that is checked only with
    SPARSEMEM_DEBUG=1 on any device: a full pass over it would cost as much as the op.
    """
    if state and not _debugging():
        return
    if _values_checked(tensor) and not all(map(math.isfinite, _extremes(tensor))):
        raise ValueError(f"{name} contains NaN or inf")


def check_range(name: str, tensor: Tensor, low: float, high: float) -> None:
    """ValueError unless low <= tensor <= high everywhere (checked like check_finite)."""
    if _values_checked(tensor):
        smallest, largest = _extremes(tensor)
        if not (math.isfinite(smallest) and math.isfinite(largest)):
            raise ValueError(f"{name} contains NaN or inf")
        if smallest < low or largest > high:
            raise ValueError(f"{name} must lie in [{low}, {high}]; got values in [{smallest}, {largest}]")


def check_indices(name: str, indices: Tensor, num_slots: int) -> None:
    """ValueError unless every index is a slot id in [0, N)."""
    if _values_checked(indices):
        low, high = _extremes(indices)
        if low < 0 or high >= num_slots:
            raise ValueError(f"{name} must hold slot ids in [0, N={num_slots}); got values in [{low}, {high}]")
