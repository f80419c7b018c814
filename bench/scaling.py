"""Memory-size scaling: time and peak memory per step against the number of slots N.

    python -m bench.scaling                # the default run (`make bench`): under 5 minutes on 2 cores
    python -m bench.scaling --full         # the long run: every power of two up to 2^20, both regimes
    python -m bench.scaling --device cuda  # the same on a GPU

NTM and DNC (dense), SAM and SDNC (sparse, once per index backend), for N from 2^10 up to
--max-slots (2^20), in the two regimes of DESIGN.md ("Two regimes, both measured"):

  fresh  an episode from a reset memory, model.init_state(B): cost follows the rows written
  full   every slot written and indexed, model.init_state(B, memory=M) with M random unit
         words; repeats continue from the state the last run left (the steady state)

Each case (model, index, regime, N) runs in its own process, so its peak memory is its own,
and is killed after --timeout seconds. It reports forward and forward+backward time per step
(the time of a T-step run divided by T: median over runs, after an untimed one-step warm-up),
the time of init_state apart from the steps (in the full regime: the index build), the
index's own merge and build time within the steps, and peak memory above the process's
baseline (RSS on the CPU, torch.cuda.max_memory_allocated on a GPU) with the index's bytes.
A case whose estimated memory exceeds what the machine has is skipped up front ("needs X
GiB"), never attempted; a series stops at a timeout or once its next size is predicted to
run past it. Models or index backends the installed sparsemem lacks are "not available".

Default config (fixed, so that runs compare): B=8, W=64, R=4, K=8, T=16, the models' LSTM
controller with 128 hidden units, 8 input features, float32. The default run takes N = 2^10,
2^12, ..., 2^20 (the full regime up to 2^18) within a time budget of 240 s for all cases,
cheapest cases first, so what does not fit is skipped with its reason; --full takes every
power of two, the full regime up to --max-slots, and no budget (HNSW builds of 2^20 rows
cost about a minute per batch row). Writes bench/results/scaling-<device>.json (with
header), scaling-<device>.md (the table and slopes), scaling-<device>-time.png and
scaling-<device>-memory.png (log-log, the fitted slope of each series in the legend).
"""

import argparse
import math
import multiprocessing
import os
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

import sparsemem as sm
from bench.common import (
    GIB,
    RESULTS,
    NotAvailable,
    PeakMemory,
    available_bytes,
    find_index,
    fit_slope,
    header,
    log2_label,
    log_axes,
    predict_seconds,
    pyplot,
    run_in_process,
    save_figure,
    write_json,
    write_text,
)

DENSE = ("NTM", "DNC")
SPARSE = ("SAM", "SDNC")
INDEXES = ("exact", "ivf", "faiss-hnsw", "faiss-ivf")
DEFAULT_INDEXES = {"cpu": ("exact", "faiss-hnsw", "faiss-ivf"), "cuda": ("exact", "ivf")}
"""faiss is the better approximate index on a CPU (bench/results/index_ivf_cpu*.json); a GPU
machine has no faiss, and sparsemem's own IVF index runs there."""
REGIMES = ("fresh", "full")
FIT_POINTS = 4
"""Slopes are fitted over the largest sizes measured, where fixed per-step costs matter least."""

# Each case process re-runs this module as __mp_main__ (multiprocessing's spawn preparation)
# after the fork server has imported it; runpy warns about that, harmlessly, once per case.
warnings.filterwarnings("ignore", message="'bench.scaling' found in sys.modules", category=RuntimeWarning)


@dataclass(frozen=True)
class Config:
    batch: int = 8
    word: int = 64
    reads: int = 4
    k: int = 8
    steps: int = 16
    hidden: int = 128
    inputs: int = 8
    device: str = "cpu"
    threads: int = 0  # 0: torch's default
    min_run_time: float = 0.5  # seconds of timed runs per phase after the warm-up run
    max_runs: int = 10


@dataclass(frozen=True)
class Case:
    model: str
    index: str | None  # None for the dense models
    regime: str
    num_slots: int

    @property
    def series(self) -> str:
        return self.model if self.index is None else f"{self.model}/{self.index}"


# ---------------------------------------------------------------------------------------------
# Memory estimate: decides up front which sizes fit, so a run never dies of memory.
# ---------------------------------------------------------------------------------------------


def estimate_bytes(case: Case, config: Config) -> int:
    """Peak bytes a case needs for forward+backward over T steps (its largest phase), float32.

    An upper bound from the shapes, checked against the peaks measured here (torch backend,
    B=8, W=64, T=16: NTM 0.9 GiB at N=2^13, DNC 0.94 GiB at 2^10, where these give 1.2 and
    1.3): dense autograd keeps several [B, N, W] memories per step (the written memory,
    the normalised one of content addressing) and, in the DNC, about two [B, N, N] link
    matrices per step (the updated links and the backward of the link update).
      NTM  4T + 8 memories [B, N, W] and 12 [B, R, N] weight vectors per step
      DNC  the same, plus 2T + 8 link matrices [B, N, N]
    Sparse (lazy memory: only written rows are real; rows written per episode are O(T*J*W)):
      full  6 memories (M, the model's copy, the index's float64 unit rows, search buffers)
      both  48 bytes per slot (written mask, slot maps, usage / LRU bookkeeping)
    """
    B, N, W, R, T = config.batch, case.num_slots, config.word, config.reads, config.steps
    word = 4
    memories, links, vectors, per_slot = 0, 0, 0, 0
    if case.model in DENSE:
        memories = 4 * T + 8
        vectors = 12 * T
        links = (2 * T + 8) if case.model == "DNC" else 0
    else:
        memories = 6 if case.regime == "full" else 0
        per_slot = 48
    return word * (memories * B * N * W + links * B * N * N + vectors * B * R * N) + per_slot * B * N


# ---------------------------------------------------------------------------------------------
# One case (run_cases runs each in its own process).
# ---------------------------------------------------------------------------------------------


def build_model(case: Case, config: Config) -> torch.nn.Module:
    """The model of a case with the fixed API of DESIGN.md; NotAvailable says why it cannot be built."""
    model_class = getattr(sm, case.model, None)
    if model_class is None:
        raise NotAvailable(f"sparsemem {sm.__version__} has no sm.{case.model}")
    kwargs = {"num_slots": case.num_slots, "word_size": config.word, "num_reads": config.reads}
    if case.index is not None:
        kwargs.update(k=config.k, index=case.index)
    try:
        return model_class(config.inputs, config.hidden, **kwargs)
    except (ImportError, NotImplementedError, ValueError) as error:
        # a missing optional package (faiss) or an index backend this version does not have
        raise NotAvailable(f"{type(error).__name__}: {error}") from error


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


INDEX_COUNTERS = ("merges", "merge_seconds", "rebuilds", "build_seconds")


def _index_counters(state: object) -> dict[str, float]:
    index = find_index(state)
    if index is None:
        return {}
    stats = index.stats()
    return {name: getattr(stats, name) for name in INDEX_COUNTERS}


def _repeat(prepare, run, state, device: torch.device, config: Config) -> dict:
    """Seconds per step of run(T steps): at least one timed run, more until min_run_time is spent.

    prepare() runs untimed before each run (a reset in the fresh regime); the caller has
    warmed up with a one-step run, so one-time costs stay out of the first timed run.
    state() is the current model state: the work its index did during the timed runs
    (merges of the exact buffer, builds) is counted, untimed, and reported per step; it
    is part of the step time.
    """
    times = []
    index = dict.fromkeys(INDEX_COUNTERS, 0.0)
    while not times or (sum(times) < config.min_run_time and len(times) < config.max_runs):
        prepare()
        before = _index_counters(state())
        _sync(device)
        start = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - start)
        for name, value in _index_counters(state()).items():
            index[name] += value - before[name]
    steps = config.steps * len(times)
    result = {
        "median": statistics.median(times) / config.steps,
        "min": min(times) / config.steps,
        "max": max(times) / config.steps,
        "runs": len(times),
    }
    if before:
        result["index"] = {
            "merges": index["merges"],
            "rebuilds": index["rebuilds"],
            "seconds_per_step": (index["merge_seconds"] + index["build_seconds"]) / steps,
        }
    return result


def measure(case: Case, config: Config) -> dict:
    """Runs one case in this process: init, forward, forward+backward; times and memory.

    Each phase starts with an untimed one-step run (lazy initialisation, allocator warm-up,
    backend selection); its memory counts in the phase's peak, as a first step would.
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(0)
    device = torch.device(config.device)
    model = build_model(case, config).to(device)
    B = config.batch
    inputs = torch.randn(B, config.steps, config.inputs, device=device)
    memory = PeakMemory(device)
    baseline = memory.current()
    full = case.regime == "full"
    words = F.normalize(torch.randn(B, case.num_slots, config.word, device=device), dim=-1) if full else None

    before_init = memory.current()
    _sync(device)
    start = time.perf_counter()
    state = model.init_state(B, memory=words) if full else model.init_state(B)
    _sync(device)
    init = {"seconds": time.perf_counter() - start, "bytes": memory.current() - before_init}
    del words  # the model holds what it needs of M
    index = find_index(state)
    if index is not None:
        stats = index.stats()
        init["index"] = {"build_seconds": stats.build_seconds, "bytes": stats.bytes, "rows": stats.rows}

    holder = {"state": state}

    def prepare_forward() -> None:
        if not full:  # drop the last episode's state before the reset, so two never coexist
            holder["state"] = None
            holder["state"] = model.init_state(B)

    def forward(x: Tensor = inputs) -> None:
        with torch.no_grad():
            holder["state"] = model(x, holder["state"])[1]

    def prepare_backward() -> None:
        model.zero_grad(set_to_none=True)
        prepare_forward()

    def forward_backward(x: Tensor = inputs) -> None:
        outputs, state = model(x, holder["state"])
        outputs.square().mean().backward()
        holder["state"] = state.detach()

    phases = {}
    peaks = {}
    for name, prepare, run in (
        ("forward", prepare_forward, forward),
        ("forward_backward", prepare_backward, forward_backward),
    ):
        if not full:
            holder["state"] = None
        memory.reset_peak()
        prepare()
        run(inputs[:, :1])
        phases[name] = _repeat(prepare, run, lambda: holder["state"], device, config)
        peaks[name] = memory.peak() - baseline
    index = find_index(holder["state"])
    if index is not None:
        peaks["index"] = index.stats().bytes
    return {
        "status": "ok",
        "init": init,
        **phases,
        "memory": {"kind": memory.kind, "baseline": baseline, **peaks},
    }


# ---------------------------------------------------------------------------------------------
# The run: plan, skip, measure, summarise.
# ---------------------------------------------------------------------------------------------


def plan(args: argparse.Namespace) -> list[Case]:
    """Every case of the run, series by series, N ascending within a series."""
    sizes = [2**e for e in range(int(math.log2(args.min_slots)), int(math.log2(args.max_slots)) + 1, args.log2_step)]
    full_top = args.max_slots if args.full else min(args.max_slots, args.max_full_slots)
    cases = []
    for model in args.models:
        for index in args.indexes if model in SPARSE else [None]:
            for regime in args.regimes:
                top = full_top if regime == "full" else args.max_slots
                cases += [Case(model, index, regime, n) for n in sizes if n <= top]
    return cases


def run_cases(
    cases: list[Case], config: Config, memory_budget: int, timeout: float, time_budget: float | None = None
) -> list[dict]:
    """Measures every case that fits; the others get their reason. Results in the order of cases.

    Each series (model, index, regime) runs its sizes in ascending order, and of all series
    the one whose next case is predicted cheapest goes first, so a spent time_budget (seconds
    for the whole run) cuts the most expensive cases, not whole series. A series stops at
    its first failure (timeout, error, not available); a case is skipped up front when its
    estimated memory exceeds memory_budget or its predicted time exceeds what is left of
    the timeout and the time budget.
    """
    queues: dict[tuple, list[Case]] = {}
    for case in cases:
        queues.setdefault((case.model, case.index, case.regime), []).append(case)
    results: dict[Case, dict] = {}
    stopped: dict[tuple, str] = {}
    done: dict[tuple, list[tuple[int, float]]] = {}

    def expected(key: tuple) -> float:
        history = done.get(key, [])
        return predict_seconds(history, queues[key][0].num_slots) or (history[-1][1] if history else 0.0)

    start = time.perf_counter()
    progress = tqdm(total=len(cases), desc="scaling", unit="case")
    while any(queues.values()):
        key = min((k for k in queues if queues[k]), key=lambda k: (expected(k), queues[k][0].num_slots))
        case = queues[key].pop(0)
        progress.set_postfix_str(f"{case.series} {case.regime} N={log2_label(case.num_slots)}")
        estimate = estimate_bytes(case, config)
        result = {**asdict(case), "series": case.series, "estimate_bytes": estimate}
        left = math.inf if time_budget is None else time_budget - (time.perf_counter() - start)
        limit = min(timeout, left)
        predicted = predict_seconds(done.get(key, []), case.num_slots)
        if not hasattr(sm, case.model):
            result.update(status="not available", reason=f"sparsemem {sm.__version__} has no sm.{case.model}")
        elif key in stopped:
            result.update(status="skipped", reason=stopped[key])
        elif estimate > memory_budget:
            result.update(status="skipped", reason=f"needs {estimate / GIB:.1f} GiB (have {memory_budget / GIB:.1f})")
        elif left <= 0:
            result.update(status="skipped", reason=f"the run's time budget ({time_budget:g} s) is spent")
        elif predicted is not None and predicted > limit:
            why = f"timeout {timeout:g} s" if limit == timeout else f"{left:.0f} s left of the run's budget"
            result.update(status="skipped", reason=f"predicted {predicted:.0f} s ({why})")
        else:
            started = time.perf_counter()
            address_space = memory_budget if config.device == "cpu" else None
            result.update(run_in_process(measure, (case, config), limit, address_space))
            if result["status"] == "timeout" and limit < timeout:
                result["reason"] += " (the rest of the run's time budget)"
            result["wall_seconds"] = time.perf_counter() - started
            if result["status"] == "ok":
                done.setdefault(key, []).append((case.num_slots, result["wall_seconds"]))
            elif result["status"] == "not available":
                stopped[key] = result["reason"]
            else:
                stopped[key] = f"after {result['status']} at N={log2_label(case.num_slots)}"
        results[case] = result
        progress.update()
    progress.close()
    return [results[case] for case in cases]


def slopes(results: list[dict]) -> list[dict]:
    """Per series and regime: fitted slopes of time (forward, forward+backward) and of peak memory."""
    rows = []
    keys = dict.fromkeys((r["series"], r["regime"]) for r in results)
    for series, regime in keys:
        ok = [r for r in results if (r["series"], r["regime"]) == (series, regime) and r["status"] == "ok"]
        ok = ok[-FIT_POINTS:]
        sizes = [r["num_slots"] for r in ok]
        rows.append(
            {
                "series": series,
                "regime": regime,
                "sizes": sizes,
                "forward": fit_slope(sizes, [r["forward"]["median"] for r in ok]),
                "forward_backward": fit_slope(sizes, [r["forward_backward"]["median"] for r in ok]),
                "memory": fit_slope(sizes, [r["memory"]["forward_backward"] for r in ok]),
            }
        )
    return rows


def crossovers(results: list[dict]) -> list[dict]:
    """Per regime, for each sparse series against each dense one: the smallest N measured for
    both at which the sparse model's forward+backward step is faster (None if at none)."""
    rows = []
    ok = [r for r in results if r["status"] == "ok"]
    for regime in REGIMES:
        times = {}
        for r in ok:
            if r["regime"] == regime:
                times.setdefault(r["series"], {})[r["num_slots"]] = r["forward_backward"]["median"]
        dense = [s for s in times if s in DENSE]
        sparse = [s for s in times if s not in DENSE]
        for s in sparse:
            for d in dense:
                common = sorted(set(times[s]) & set(times[d]))
                faster = [n for n in common if times[s][n] < times[d][n]]
                rows.append(
                    {
                        "regime": regime,
                        "sparse": s,
                        "dense": d,
                        "N": faster[0] if faster else None,
                        "compared": [common[0], common[-1]] if common else None,
                    }
                )
    return rows


def table(results: list[dict]) -> str:
    """A markdown table: one row per measured case; a series' run of skipped sizes on one row."""
    lines = [
        "| model | regime | N | fwd ms/step | fwd+bwd ms/step | index ms/step | init s | peak MiB | index MiB | note |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    position = 0
    while position < len(results):
        r = results[position]
        if r["status"] == "ok":
            index = r["forward_backward"].get("index")
            index_time = f"{index['seconds_per_step'] * 1e3:.2f}" if index else ""
            index_bytes = f"{r['memory']['index'] / 2**20:.0f}" if "index" in r["memory"] else ""
            lines.append(
                f"| {r['series']} | {r['regime']} | {log2_label(r['num_slots'])} "
                f"| {r['forward']['median'] * 1e3:.2f} | {r['forward_backward']['median'] * 1e3:.2f} "
                f"| {index_time} | {r['init']['seconds']:.2f} "
                f"| {r['memory']['forward_backward'] / 2**20:.0f} | {index_bytes} | |"
            )
            position += 1
            continue
        last = position
        while (
            last + 1 < len(results)
            and results[last + 1]["status"] == r["status"]
            and (results[last + 1]["series"], results[last + 1]["regime"]) == (r["series"], r["regime"])
        ):
            last += 1
        sizes = log2_label(r["num_slots"])
        if last > position:
            sizes += f"..{log2_label(results[last]['num_slots'])}"
        note = r["reason"] if r["status"] == "skipped" else f"{r['status']}: {r['reason']}"
        lines.append(f"| {r['series']} | {r['regime']} | {sizes} | | | | | | | {note.replace('|', '/')} |")
        position = last + 1
    return "\n".join(lines)


def pivot(results: list[dict], regime: str) -> str:
    """Forward+backward ms per step of one regime as a markdown table: a row per N, a column per series."""
    rows = [r for r in results if r["regime"] == regime]
    series = list(dict.fromkeys(r["series"] for r in rows))
    cells = {(r["series"], r["num_slots"]): r for r in rows}
    lines = [f"| N | {' | '.join(series)} |", "|---|" + "---:|" * len(series)]
    for n in sorted({r["num_slots"] for r in rows}):
        row = []
        for name in series:
            case = cells.get((name, n))
            if case is None:
                row.append("")
            elif case["status"] == "ok":
                row.append(f"{case['forward_backward']['median'] * 1e3:.0f}")
            else:
                row.append("skipped" if case["status"] == "skipped" else case["status"])
        lines.append(f"| {log2_label(n)} | {' | '.join(row)} |")
    return "\n".join(lines)


def summary(slope_rows: list[dict], crossover_rows: list[dict]) -> str:
    def fmt(value: float | None) -> str:
        return "" if value is None else f"{value:.2f}"

    lines = [
        f"Slopes (log-log, largest {FIT_POINTS} sizes measured):",
        "",
        "| model | regime | sizes | fwd | fwd+bwd | peak memory |",
        "|---|---|---|---:|---:|---:|",
    ]
    for s in slope_rows:
        if s["sizes"]:
            sizes = f"{log2_label(s['sizes'][0])}..{log2_label(s['sizes'][-1])}"
            lines.append(
                f"| {s['series']} | {s['regime']} | {sizes} | {fmt(s['forward'])} "
                f"| {fmt(s['forward_backward'])} | {fmt(s['memory'])} |"
            )
    if crossover_rows:
        lines += ["", "Crossover (smallest N where the sparse fwd+bwd step is faster than the dense one):", ""]
        for c in crossover_rows:
            first, last = (log2_label(n) for n in c["compared"]) if c["compared"] else ("", "")
            if c["compared"] is None:
                found = "no size measured for both"
            elif c["N"] is None:
                found = f"not faster at any N in {first}..{last}"
            elif c["N"] == c["compared"][0]:
                found = f"faster from the smallest N compared, {first} (up to {last})"
            else:
                found = f"N = {log2_label(c['N'])} (compared {first}..{last})"
            lines.append(f"- {c['regime']}: {c['sparse']} vs {c['dense']}: {found}")
    return "\n".join(lines)


def plot(results: list[dict], slope_rows: list[dict], stem: Path) -> list[Path]:
    """Log-log plots of time per step and of peak memory against N, the slope of each series in its label."""
    plt = pyplot()
    slope_of = {(s["series"], s["regime"]): s for s in slope_rows}
    series = list(dict.fromkeys(r["series"] for r in results))
    # colour by model, line style by index backend
    colors = {model: plt.get_cmap("tab10")(i) for i, model in enumerate(DENSE + SPARSE)}
    styles = {None: "-", "exact": "-", "faiss-hnsw": "--", "faiss-ivf": ":"}

    def draw(axis, regime: str, metric: str, value) -> None:
        for name in series:
            ok = [r for r in results if (r["series"], r["regime"]) == (name, regime) and r["status"] == "ok"]
            if not ok:
                continue
            slope = slope_of[(name, regime)][metric]
            label = name if slope is None else f"{name} (slope {slope:.2f})"
            axis.plot(
                [r["num_slots"] for r in ok],
                [value(r) for r in ok],
                styles[ok[0]["index"]],
                marker="o",
                ms=3,
                color=colors[ok[0]["model"]],
                label=label,
            )
        log_axes(axis, x_label="N (memory slots)", y_base=2)
        if axis.has_data():
            axis.legend(fontsize=7)
        else:
            axis.text(0.5, 0.5, "nothing measured", ha="center", va="center", transform=axis.transAxes)

    paths = []
    figure, axes = plt.subplots(2, 2, figsize=(12, 9), squeeze=False)
    for row, regime in enumerate(REGIMES):
        for column, (metric, title) in enumerate((("forward", "forward"), ("forward_backward", "forward+backward"))):
            axis = axes[row][column]
            draw(axis, regime, metric, lambda r, m=metric: r[m]["median"] * 1e3)
            axis.set_title(f"{regime} memory: {title} time per step")
            axis.set_ylabel("ms per step")
    figure.tight_layout()
    paths.append(save_figure(figure, stem.with_name(stem.name + "-time.png"), dpi=110))

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), squeeze=False)
    for column, regime in enumerate(REGIMES):
        axis = axes[0][column]
        draw(axis, regime, "memory", lambda r: r["memory"]["forward_backward"] / 2**20)
        axis.set_title(f"{regime} memory: peak memory of forward+backward")
        axis.set_ylabel("MiB above the process baseline")
    figure.tight_layout()
    paths.append(save_figure(figure, stem.with_name(stem.name + "-memory.png"), dpi=110))
    plt.close("all")
    return paths


def _slots(text: str) -> int:
    """N as 1048576, 2^20 or 2**20; a power of two."""
    base, _, exponent = text.replace("**", "^").partition("^")
    value = int(base) ** int(exponent) if exponent else int(base)
    if value < 1 or value & (value - 1):
        raise argparse.ArgumentTypeError(f"{text} is not a power of two")
    return value


def _names(allowed: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {','.join(allowed)}")
        return names

    return parse


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Config()
    parser.add_argument("--models", type=_names(DENSE + SPARSE), default=list(DENSE + SPARSE))
    parser.add_argument(
        "--indexes",
        type=_names(INDEXES),
        help="for SAM and SDNC (default: exact and faiss on a CPU, exact and ivf on a GPU)",
    )
    parser.add_argument("--regimes", type=_names(REGIMES), default=list(REGIMES))
    parser.add_argument("--min-slots", type=_slots, default=2**10)
    parser.add_argument("--max-slots", type=_slots, default=2**20)
    parser.add_argument("--max-full-slots", type=_slots, default=2**18, help="top N of the full regime")
    parser.add_argument(
        "--log2-step", type=int, help="N grows by 2^step from one size to the next (default 2; --full: 1)"
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="the long run: every power of two, the full regime up to --max-slots, no time budget",
    )
    parser.add_argument("--batch", type=int, default=defaults.batch, help="B")
    parser.add_argument("--word", type=int, default=defaults.word, help="W")
    parser.add_argument("--reads", type=int, default=defaults.reads, help="R")
    parser.add_argument("--k", type=int, default=defaults.k, help="K, sparse models")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="T")
    parser.add_argument("--hidden", type=int, default=defaults.hidden, help="LSTM controller units")
    parser.add_argument("--inputs", type=int, default=defaults.inputs, help="input features")
    parser.add_argument("--device", default=defaults.device, help="cpu or cuda[:i]")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch threads (0: default)")
    parser.add_argument("--min-run-time", type=float, default=defaults.min_run_time)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per case")
    parser.add_argument(
        "--time-budget", type=float, default=240.0, help="seconds for all cases, 0: none (--full: none)"
    )
    parser.add_argument("--memory-gib", type=float, help="memory budget (default: what the machine has now)")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/scaling-<device>.json)")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    if args.log2_step is None:
        args.log2_step = 1 if args.full else 2
    if args.indexes is None:
        args.indexes = list(DEFAULT_INDEXES["cuda" if args.device.startswith("cuda") else "cpu"])
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: torch here has no CUDA device")

    config = Config(
        batch=args.batch,
        word=args.word,
        reads=args.reads,
        k=args.k,
        steps=args.steps,
        hidden=args.hidden,
        inputs=args.inputs,
        device=args.device,
        threads=args.threads,
        min_run_time=args.min_run_time,
    )
    budget = int(args.memory_gib * GIB) if args.memory_gib else available_bytes(args.device)
    out = args.out or RESULTS / f"scaling-{args.device.replace(':', '')}.json"
    cases = plan(args)
    # OpenMP threads that spin while they wait for each other cost 10x and more on a machine
    # busier than its cores (measured here: content_read 83 ms spinning, 21 ms passive);
    # set before the fork server starts, as libgomp reads it once when torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # The server that forks each case imports torch and sparsemem once, not once per case, and
    # torch._dynamo, which the first call of a custom op imports (~4 s here; imports only: no
    # compute runs in the server, so no thread pool is forked).
    multiprocessing.get_context("forkserver").set_forkserver_preload(["torch._dynamo", "bench.scaling"])

    time_budget = None if args.full or args.time_budget <= 0 else args.time_budget
    run_config = {
        **asdict(config),
        "dtype": "float32",
        "timeout": args.timeout,
        "time_budget": time_budget,
        "memory_budget_gib": round(budget / GIB, 2),
        "full_regime_max_slots": args.max_slots if args.full else min(args.max_slots, args.max_full_slots),
        "log2_step": args.log2_step,
        "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
        "load_average_at_start": os.getloadavg()[0],  # other work on the machine slows every case
        "command": " ".join(["python -m bench.scaling", *(sys.argv[1:] if argv is None else argv)]),
    }
    start = time.perf_counter()
    results = run_cases(cases, config, budget, args.timeout, time_budget)
    wall = time.perf_counter() - start
    slope_rows, crossover_rows = slopes(results), crossovers(results)
    pivots = "\n\n".join(
        f"Forward+backward ms per step, {regime} memory:\n\n{pivot(results, regime)}" for regime in REGIMES
    )
    text = f"{table(results)}\n\n{pivots}\n\n{summary(slope_rows, crossover_rows)}"
    payload = {
        "header": header(run_config),
        "wall_seconds": wall,
        "cases": results,
        "slopes": slope_rows,
        "crossovers": crossover_rows,
        "plots": [],
    }
    stem = out.with_suffix("")
    if not args.no_plot:
        payload["plots"] = [p.name for p in plot(results, slope_rows, stem)]
    write_json(out, payload)
    markdown = stem.with_name(stem.name + ".md")
    write_text(markdown, text + "\n")
    written = ", ".join([markdown.name, *payload["plots"]])
    print(f"\n{text}\n\n{len(cases)} cases in {wall:.0f} s; wrote {out} and {written}")
    return payload


if __name__ == "__main__":
    # Run under the module's own name, not __main__, so that the case processes can
    # unpickle measure, Case and Config by reference.
    from bench import scaling

    scaling.main()
