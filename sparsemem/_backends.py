"""Backend dispatch: which implementation of an op runs on which device.

Per device an ordered preference (cuda: triton > cuda > torch; cpu: cpp > torch);
the first backend that is available on this machine and implements the op runs.
SPARSEMEM_BACKEND=torch|triton|cpp|cuda forces one backend for every op it
implements (the others keep using torch). Importing sparsemem never fails because
an extension is missing: availability() says why a backend cannot run.

This module is the one list of ops and backends: each op is declared once (declare(), called by
ops/_define.py's define_op) with its family's file stem and the backends it has kernel sources
for, and each backend's kernel is registered here. Everything else (tests, benchmarks,
sparsemem.testing) asks through the public functions: ops(), op_info(), implementations(),
backends_for().
"""

import functools
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

BACKENDS = ("torch", "cpp", "triton", "cuda")
PREFERENCE = {"cpu": ("cpp", "torch"), "cuda": ("triton", "cuda", "torch")}


@dataclass(frozen=True)
class Kernel:
    """A forward and its backward: backward(grads, inputs, outputs) -> a grad (or None) per input."""

    forward: Callable[..., Tensor | tuple[Tensor, ...]]
    backward: Callable[..., tuple[Tensor | None, ...]]


@dataclass(frozen=True)
class OpInfo:
    """What the registry knows of an op besides its kernels.

    stem: the file stem of its family in every layer (ops/<stem>.py, kernels/<stem>.py,
      csrc/cpu/<stem>.cpp, csrc/cuda/<stem>.cu, tests/ops/test_<stem>.py);
    backends: the backends with kernel sources for it (torch always: its reference), built here or not;
    inputs: its argument names; differentiable: the positions of those that take a gradient;
    public: exported in sparsemem.ops (journaled_write is not: it is the journal's building block).
    """

    stem: str
    backends: tuple[str, ...]
    inputs: tuple[str, ...]
    differentiable: tuple[int, ...]
    public: bool


@dataclass(frozen=True)
class OpBackends:
    """sparsemem.backends_for(op, device): which backends implement `op` and which can run it on `device`.

    implemented: backends with a kernel of op, built here or not (torch, the reference, always);
    runnable: those that can run op on tensors of `device` on this machine;
    unavailable: every other backend -> why not (no kernel, not built, no GPU, wrong device);
    chosen: the backend a call on `device` runs now (SPARSEMEM_BACKEND included), None when
      SPARSEMEM_BACKEND forces a backend that cannot run here (calls raise then).
    """

    op: str
    device: str
    implemented: tuple[str, ...]
    runnable: tuple[str, ...]
    unavailable: dict[str, str]
    chosen: str | None


_OPS: dict[str, OpInfo] = {}
_KERNELS: dict[str, dict[str, Kernel]] = {}
# (op, device type, SPARSEMEM_BACKEND as set) -> kernel: every op call looks its kernel up, so the
# choice is made once per key; a new value of the variable is a new key.
_CHOSEN: dict[tuple[str, str, str | None], Kernel] = {}


def declare(op: str, info: OpInfo) -> None:
    """Add `op` to the list of ops (define_op calls this once per op, before its kernels register)."""
    unknown = set(info.backends) - set(BACKENDS)
    if unknown or "torch" not in info.backends:
        raise ValueError(f"{op}: backends must include torch and lie in {BACKENDS}; got {info.backends}")
    _OPS[op] = info


def register(op: str, backend: str, kernel: Kernel) -> None:
    """Add one backend's kernel for a declared `op` to the table (ops/ calls this at import)."""
    if op not in _OPS:
        raise ValueError(f"{op!r} is not declared; declare it (define_op does) before registering kernels")
    if backend not in _OPS[op].backends:
        raise ValueError(f"{op} declares no {backend} kernel (its backends: {_OPS[op].backends})")
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _KERNELS.setdefault(op, {})[backend] = kernel
    _select.cache_clear()
    _CHOSEN.clear()


def extension() -> object | None:
    """The compiled extension sparsemem._C (its ops live in torch.ops.sparsemem), or None."""
    try:
        return importlib.import_module("sparsemem._C")
    except ImportError:
        return None


@functools.cache
def _extension_error() -> str | None:
    try:
        importlib.import_module("sparsemem._C")
    except ImportError as error:
        return f"the C++ extension sparsemem._C is not built ({error}); reinstall with SPARSEMEM_BUILD_EXT=1"
    return None


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _unavailable(backend: str) -> str | None:
    """None when `backend` can run on this machine, else why it cannot."""
    if backend == "torch":
        return None
    if backend == "cpp":
        return _extension_error()
    if backend == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device (torch.cuda.is_available() is False)"
        if _extension_error():
            return _extension_error()
        if "cuda" not in torch.ops.sparsemem.ext_info():
            return "sparsemem._C was built without CUDA (torch without CUDA, or no nvcc at build time)"
        return None
    if backend == "triton":
        try:
            importlib.import_module("triton")
        except ImportError:
            return "triton is not installed (pip install triton)"
        if not torch.cuda.is_available() and not _triton_interpreted():
            return "no GPU for triton (set TRITON_INTERPRET=1 to run its kernels on the CPU, slowly)"
        return None
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def _runs_on(backend: str, device_type: str) -> bool:
    if backend == "torch":
        return True
    if backend == "triton":
        return device_type == "cuda" or (device_type == "cpu" and _triton_interpreted())
    return device_type == ("cpu" if backend == "cpp" else "cuda")


def _wrong_device(backend: str, device_type: str) -> str:
    if backend == "triton":
        return f"triton runs on cuda tensors (on {device_type} only interpreted, with TRITON_INTERPRET=1)"
    return f"{backend} runs on {'cpu' if backend == 'cpp' else 'cuda'} tensors, not {device_type}"


def ops(public: bool | None = None) -> tuple[str, ...]:
    """Every declared op in declaration order; public=True: only those of sparsemem.ops, False: the others."""
    return tuple(op for op, info in _OPS.items() if public is None or info.public == public)


def op_info(op: str) -> OpInfo:
    """The declaration of `op`: its family's file stem, backends, inputs."""
    try:
        return _OPS[op]
    except KeyError:
        raise ValueError(f"unknown op {op!r}; the ops are {', '.join(_OPS)}") from None


def implementations(op: str) -> dict[str, Kernel]:
    """backend -> the kernel of `op` registered on this machine (torch always; others if built)."""
    op_info(op)
    return dict(_KERNELS[op])


def backends_for(op: str, device: torch.device | str | None = None) -> OpBackends:
    """Which backends implement `op`, which can run it on `device` here, and why the others cannot.

    device: a torch.device or its name; None: cuda when a GPU is available, else cpu. Only the
    device type matters. Also sparsemem.backends_for.
    """
    info = op_info(op)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    registered = _KERNELS[op]
    runnable, unavailable = [], {}
    for backend in BACKENDS:
        if backend not in info.backends:
            unavailable[backend] = f"{op} has no {backend} kernel"
        elif _unavailable(backend) is not None:
            unavailable[backend] = _unavailable(backend)
        elif not _runs_on(backend, device_type):
            unavailable[backend] = _wrong_device(backend, device_type)
        elif backend not in registered:
            unavailable[backend] = f"sparsemem._C has no {backend} kernel of {op}; rebuild it (make setup)"
        else:
            runnable.append(backend)
    try:
        chosen = _select(op, device_type, forced_backend())
    except RuntimeError:
        chosen = None
    implemented = tuple(b for b in BACKENDS if b in info.backends)
    return OpBackends(op, device_type, implemented, tuple(runnable), unavailable, chosen)


def availability() -> dict[str, str | None]:
    """backend -> None when it can run here, else the reason it cannot."""
    return {backend: _unavailable(backend) for backend in BACKENDS}


def forced_backend() -> str | None:
    forced = os.environ.get("SPARSEMEM_BACKEND", "").strip() or None
    if forced is not None and forced not in BACKENDS:
        raise ValueError(f"SPARSEMEM_BACKEND={forced!r}; expected one of {BACKENDS}")
    return forced


def kernel(op: str, device: torch.device) -> Kernel:
    """The kernel of `op` that runs for tensors on `device`."""
    key = (op, device.type, os.environ.get("SPARSEMEM_BACKEND"))
    chosen = _CHOSEN.get(key)
    if chosen is None:
        chosen = _CHOSEN[key] = _KERNELS[op][backend_for(op, device)]
    return chosen


def backend_for(op: str, device: torch.device) -> str:
    """The name of the backend that runs `op` on `device`."""
    return _select(op, device.type, forced_backend())


@functools.cache
def _select(op: str, device_type: str, forced: str | None) -> str:
    kernels = _KERNELS[op]
    if forced is not None:
        reason = _unavailable(forced)
        if reason is not None:
            raise RuntimeError(f"SPARSEMEM_BACKEND={forced}, but it cannot run here: {reason}")
        return forced if forced in kernels and _runs_on(forced, device_type) else "torch"
    for backend in PREFERENCE.get(device_type, ("torch",)):
        if backend in kernels and _unavailable(backend) is None and _runs_on(backend, device_type):
            return backend
    return "torch"


def backends() -> str:
    """A report of the backends on this machine and which one runs each op; also printed."""
    lines = ["backend  status"]
    for backend, reason in availability().items():
        lines.append(f"{backend:<8} {'available' if reason is None else 'unavailable: ' + reason}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    lines.append("")
    lines.append("op" + " " * 22 + "".join(f"{d:<10}" for d in devices) + "implemented by")
    for op in sorted(_KERNELS):
        chosen = "".join(f"{_select(op, d, forced_backend()):<10}" for d in devices)
        lines.append(f"{op:<24}{chosen}{', '.join(sorted(_KERNELS[op]))}")
    report = "\n".join(lines)
    print(report)
    return report
