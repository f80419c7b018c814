"""The harness every benchmark shares; each bench is its cases.

Result files (header, atomic JSON / text / PNG writes), timing, memory (RSS, peak, what the
machine has), processes (a case in its own process, so its peak memory is its own), fits
(log-log slopes) and log-log plots.
"""

import itertools
import json
import math
import multiprocessing
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.utils.benchmark as torch_benchmark
from torch import Tensor

from sparsemem._files import atomic_write
from sparsemem._provenance import source_commit
from sparsemem.index import Index

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 2**30

# ---------------------------------------------------------------------------------------------
# Result files
# ---------------------------------------------------------------------------------------------


def header(config: dict) -> dict:
    """Machine, CPU, torch, commit and the run's config: carried by every result file."""
    return {
        "machine": platform.node(),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "commit": source_commit(),
        "config": config,
    }


def trained_at(runs: list[dict]) -> str:
    """A line naming the commits the runs trained at and the load average (5 minutes) at each
    session's last checkpoint, from their summaries' "sessions" (train's provenance); "" if none
    has any (runs older than it)."""
    sessions = [session for run in runs for session in run.get("sessions", [])]
    if not sessions:
        return ""
    commits = sorted({session["commit"] for session in sessions})
    loads = [session["load_average"][1] for session in sessions]
    recorded = sum(bool(run.get("sessions")) for run in runs)
    older = "" if recorded == len(runs) else f" ({recorded} of {len(runs)} runs; the others predate the record)"
    return (
        f"Trained at {', '.join(commits)}{older}; load average (5 minutes) at each session's last checkpoint "
        f"{min(loads):.1f}-{max(loads):.1f}.\n"
    )


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_json(path: Path, payload: dict) -> Path:
    return atomic_write(path, lambda temporary: temporary.write_text(json.dumps(payload, indent=2)))


def write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda temporary: temporary.write_text(text))


def save_figure(figure, path: Path, dpi: int) -> Path:
    # bbox "tight": axis labels and legends outside the axes are kept, not cut at the figure's edge
    return atomic_write(path, lambda temporary: figure.savefig(temporary, dpi=dpi, bbox_inches="tight"))


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def time_cpu(fn, min_run_time: float = 0.2) -> dict:
    """Median, interquartile range and the 10/25/75/90% quantiles in seconds, from
    torch.utils.benchmark (adaptive repeats)."""
    measurement = torch_benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    times = torch.tensor(measurement.times, dtype=torch.float64)
    quantiles = torch.quantile(times, torch.tensor([0.1, 0.25, 0.75, 0.9], dtype=torch.float64)).tolist()
    return {
        "median": measurement.median,
        "iqr": measurement.iqr,
        **{f"q{int(q * 100)}": value for q, value in zip((0.1, 0.25, 0.75, 0.9), quantiles, strict=True)},
        "runs": len(measurement.times),
    }


def time_gpu(fn) -> dict:
    """Median and 20/80% quantiles in seconds, from triton.testing.do_bench (CUDA events, L2 flushed)."""
    from triton.testing import do_bench

    q20, median, q80 = do_bench(fn, quantiles=[0.2, 0.5, 0.8])
    return {"median": median / 1e3, "q20": q20 / 1e3, "q80": q80 / 1e3}


def copy_bandwidth(num_bytes: int = 2**30) -> float:
    """Device-to-device copy bandwidth in bytes per second (read + write), the GPU's roofline for ops."""
    source = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    return 2 * num_bytes / time_gpu(lambda: target.copy_(source))["median"]


def measured_median(values: list[float]) -> float:
    """The middle value (the upper middle one of an even count): always one that was measured."""
    return sorted(values)[len(values) // 2]


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


def proc_status(field: str) -> int:
    """A size field of /proc/self/status (VmRSS, VmHWM, VmSize) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_bytes() -> int:
    """This process's resident memory now."""
    return proc_status("VmRSS")


def peak_rss_bytes() -> int:
    """This process's peak resident memory since it started (ru_maxrss; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Current and peak memory of this process on one device, with a resettable peak.

    CPU: VmRSS / VmHWM from /proc/self/status; writing 5 to /proc/self/clear_refs resets
    the peak (Linux >= 4.0). Elsewhere the peak is ru_maxrss, which cannot be reset, so
    later phases report the peak so far ("rss-cumulative"). GPU: the caching allocator's
    allocated bytes.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            self.kind = "cuda-allocated"
        else:
            self.kind = "rss" if self._can_reset_rss() else "rss-cumulative"

    @staticmethod
    def _can_reset_rss() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return rss_bytes() if self.kind == "rss" else peak_rss_bytes()

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == "rss":
            Path("/proc/self/clear_refs").write_text("5")

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return proc_status("VmHWM") if self.kind == "rss" else peak_rss_bytes()


def time_sequences(
    model: torch.nn.Module, forward: Callable[[], Tensor], backward: bool, warmup: int, repeats: int
) -> tuple[list[float], int]:
    """A model's sequence timed: y = forward() (under no_grad unless backward), then with backward
    mean(y^2).backward() and the gradients dropped; `warmup` untimed, then `repeats` timed ->
    (their seconds, the peak resident memory over them)."""

    def sequence() -> None:
        with torch.set_grad_enabled(backward):
            y = forward()
            if backward:
                y.square().mean().backward()
                model.zero_grad(set_to_none=True)

    for _ in range(warmup):
        sequence()
    peak = PeakMemory(torch.device("cpu"))
    peak.reset_peak()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        sequence()
        seconds.append(time.perf_counter() - started)
    return seconds, peak.peak()


def available_bytes(device: str) -> int:
    """What the machine has now: MemAvailable on the CPU, free memory on the GPU."""
    if device.startswith("cuda"):
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return free
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def limit_address_space(budget: int) -> None:
    """Caps this process's address space at its size now plus budget, so an estimate that was
    too low fails the case with an allocation error instead of calling the kernel's OOM killer
    onto a shared machine."""
    size = proc_status("VmSize") if Path("/proc/self/status").exists() else 0
    limit = size + budget + 2 * GIB  # slack for thread stacks and allocator arenas
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


# ---------------------------------------------------------------------------------------------
# A sparse model's index
# ---------------------------------------------------------------------------------------------


def find_index(state: object) -> Index | None:
    """The nearest-neighbour index inside a sparse model's state; None for the dense models.

    Where it sits (state -> memory state -> lazy rows -> index) is the memory module's
    business, so this looks for it breadth first instead of naming the path.
    """
    frontier, seen = [state], set()
    for _depth in range(6):
        following = []
        for value in frontier:
            if isinstance(value, Index):
                return value
            if id(value) in seen or isinstance(value, Tensor | str | int | float | bool | None):
                continue
            seen.add(id(value))
            if isinstance(value, list | tuple):
                following.extend(value)
            elif hasattr(value, "__dict__"):
                following.extend(vars(value).values())
        frontier = following
    return None


# ---------------------------------------------------------------------------------------------
# A case in its own process
# ---------------------------------------------------------------------------------------------


class NotAvailable(Exception):
    """The installed sparsemem cannot run this case (no such model, index backend, package)."""


def run_module(module: str, args: list[str], env: dict[str, str] | None = None) -> dict:
    """`python -m module args` in a fresh process: the JSON object its last line of output prints,
    or {"args": args, "error": the last line of its errors, or its exit code}."""
    done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, check=False, env=env)
    if done.returncode:
        error = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode
        return {"args": args, "error": error}
    return json.loads(done.stdout.strip().splitlines()[-1])


def evaluate_once(run: Path, out: Path, options: list[str]) -> dict:
    """`python -m sparsemem.evaluate run options --out out`, unless `out` already holds its JSON
    (an interrupted table goes on where it stopped) -> that JSON. A failed evaluation raises with
    its errors."""
    if not out.is_file():
        command = [sys.executable, "-m", "sparsemem.evaluate", str(run), *options, "--out", str(out), "--quiet"]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode:
            raise RuntimeError(f"{shlex.join(command)} failed:\n{done.stderr[-2000:]}")
    return json.loads(out.read_text())


TRAIN_COMMANDS = "commands.txt"
"""In each training run's folder: every command that trained it, one a line (the first, then the resumes)."""


def train_command(out: Path, resume: bool, options: list[str]) -> list[str]:
    """`python -m sparsemem.train` for one run: a new one with all its options, or a --resume of
    `out` with only what a resume may change (the rest comes from its checkpoint)."""
    command = [sys.executable, "-m", "sparsemem.train"]
    if resume:
        kept = ("--time-budget", "--threads", "--steps")
        given = [(flag, value) for flag, value in itertools.pairwise(options) if flag in kept]
        return [*command, "--resume", "--out", str(out), "--no-progress", *[x for pair in given for x in pair]]
    return [*command, *options, "--out", str(out), "--no-progress"]


def budget_spent(out: Path, minutes: float) -> bool:
    """Whether the run in `out` ended (its summary is written) with a --time-budget of at least
    `minutes`: reached its threshold or its steps, or trained its minutes."""
    summary = out / "summary.json"
    if not summary.is_file():
        return False
    config = json.loads(summary.read_text())["config"]
    return config.get("time_budget") is not None and config["time_budget"] >= minutes


def run_trainings(runs: dict[str, tuple[Path, list[str]]], minutes: float, jobs: int) -> None:
    """Train every run {name: (out, train options)} that has budget left, `jobs` processes at
    a time (started in order, the next as soon as any of them ends). A run whose
    folder holds a checkpoint is resumed (its budget adds up across sessions); one that already
    spent `minutes` is read as it is. A failed run raises with its log's tail once the others end."""
    pending = []
    for name, (out, options) in runs.items():
        if budget_spent(out, minutes):
            print(f"{name}: {out} ended with a budget of {minutes} minutes or more; read as it is")
        else:
            pending.append((name, out, options))
    running, failed = [], []

    def wait_one() -> None:
        while (ended := next((run for run in running if run[2].poll() is not None), None)) is None:
            time.sleep(0.5)
        running.remove(ended)
        name, out, process, log = ended
        code = process.returncode
        log.close()
        if code != 0:
            failed.append(
                f"{name} failed (exit {code}):\n" + "\n".join((out / "train.log").read_text().splitlines()[-15:])
            )

    for name, out, options in pending:
        if len(running) >= jobs:
            wait_one()
        command = train_command(out, (out / "checkpoint.pt").is_file(), options)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / TRAIN_COMMANDS, "a") as commands:
            commands.write(shlex.join(command) + "\n")
        log = open(out / "train.log", "a")  # noqa: SIM115 (closed in wait_one, after the process ends)
        print(f"{name}: {shlex.join(command)}", flush=True)
        running.append((name, out, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), log))
    while running:
        wait_one()
    if failed:
        raise RuntimeError("\n".join(failed))


def run_in_process(function: Callable[..., dict], args: tuple, timeout: float, memory_budget: int | None) -> dict:
    """function(*args) in a fresh process forked from the fork server (which has imported torch
    once, see multiprocessing.set_forkserver_preload), killed after timeout seconds.

    function returns a dict, its result; its exceptions become {"status", "reason"}: "not
    available" for NotAvailable and ImportError (an optional package such as faiss, needed
    only once the case runs), "error" for the rest; a timeout or a dead process likewise.
    memory_budget (bytes): the process's address space is capped at its start plus this.
    function and args are pickled: module-level names of an importable module.
    """
    context = multiprocessing.get_context("forkserver")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(function, args, memory_budget, sender), daemon=True)
    process.start()
    sender.close()
    try:
        if not receiver.poll(timeout):
            return {"status": "timeout", "reason": f"over {timeout:.3g} s"}
        return receiver.recv()
    except EOFError:
        process.join()
        code = process.exitcode
        cause = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return {"status": "error", "reason": f"the case's process died ({cause})"}
    finally:
        if process.is_alive():
            process.kill()
        process.join()
        receiver.close()


def _child(function: Callable[..., dict], args: tuple, memory_budget: int | None, connection) -> None:
    try:
        if memory_budget is not None:
            limit_address_space(memory_budget)
        result = function(*args)
    except NotAvailable as error:
        result = {"status": "not available", "reason": str(error)}
    except ImportError as error:
        result = {"status": "not available", "reason": f"{type(error).__name__}: {error}"}
    except Exception as error:  # whatever a case raises is its result, reported in the table
        result = {"status": "error", "reason": f"{type(error).__name__}: {error}"}
    connection.send(result)
    connection.close()


# ---------------------------------------------------------------------------------------------
# Fits and plots
# ---------------------------------------------------------------------------------------------


def fit_slope(sizes: list[float], values: list[float]) -> float | None:
    """Least-squares slope of log(value) against log(N): value ~ c * N^slope.

    Points with a non-positive value are left out; fewer than two points give None.
    """
    points = [(math.log(n), math.log(v)) for n, v in zip(sizes, values, strict=True) if v > 0]
    if len(points) < 2:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    if spread == 0:
        return None
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread


def predict_seconds(done: list[tuple[int, float]], num_slots: int) -> float | None:
    """A case's wall time at num_slots, extrapolated from the last two of its series (slope >= 0)."""
    if len(done) < 2:
        return None
    (n1, t1), (n2, t2) = done[-2:]
    slope = max(0.0, math.log(t2 / t1) / math.log(n2 / n1))
    return t2 * (num_slots / n2) ** slope


def log2_label(n: int) -> str:
    """2^k for a power of two, else the number."""
    return f"2^{int(math.log2(n))}" if n & (n - 1) == 0 else str(n)


def pyplot():
    """matplotlib.pyplot drawing to files only (Agg), imported when a plot is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def log_axes(axis, title: str | None = None, x_label: str = "N", log_y: bool = True, y_base: int = 10) -> None:
    """N on a base-2 log axis, the value on a log axis (or linear), a grid on both."""
    axis.set_xscale("log", base=2)
    if log_y:
        axis.set_yscale("log", base=y_base)
    if title is not None:
        axis.set_title(title)
    axis.set_xlabel(x_label)
    axis.grid(True, which="both", alpha=0.3)
