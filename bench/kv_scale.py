"""A learned SAM that needs its million slots: SAM and SDNC learn key-value recall from a seeded
random initialisation with a curriculum (8 to 128 pairs), then the same weights answer queries about
1,000, 10,000 and 100,000 pairs with memories of 2^10 to 2^20 slots. A DNC (at the N it trained with)
and a plain LSTM train on the same budget.

    python -m bench.kv_scale                                   # train (resumable), evaluate, table, plots
    python -m bench.kv_scale --pairs 1000 10000 --slots 1024 16384 --jobs 2
    python -m bench.kv_scale --runs bench/results/learning/kv-scale --minutes 25   # the committed runs

Each run is `python -m sparsemem.train` in its own process (one thread, --jobs at once), capped by
--minutes of training (its --time-budget; a folder with a checkpoint is resumed, its budget adding up
across sessions), under --runs/<name>. Every cell is then `python -m sparsemem.evaluate` on fresh
episodes (seed 1234) at one N and one episode length, scoring --answers final queries (queries about
pairs from anywhere in the episode: only a memory that kept them all answers); its JSON is kept under
--runs/evaluations, so an interrupted grid goes on where it stopped. Writes
bench/results/learning/kv-scale.{json,md,png} and kv-scale-curves.png (the learning curves).
"""

import argparse
import itertools
import json
import math
import os
import shlex
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import (
    RESULTS,
    evaluate_once,
    header,
    log2_label,
    pyplot,
    run_trainings,
    save_figure,
    write_json,
    write_text,
)
from sparsemem.train import METRICS

COMMON = (
    "--task key-value-recall --key-bits 64 --min-level 8 --max-level 128 --curriculum-growth 2 --window 5 "
    "--hidden-size 128 --lr 3e-3 --batch-size 16 --steps 1000000 --seed 0"
)
"""Every run's options. 64-bit keys: among 100,000 random 32-bit keys the nearest other key is ~4 bits
away, among 64-bit ones ~15 (a sharper read is not what this measures)."""

MEMORY = "--controller feedforward --word-size 64 --num-reads 1"
"""The memory models' options. The feed-forward controller carries nothing across time steps but
the memory, so what a run learns at 128 pairs holds at 100,000."""

RUNS = {
    "sam-1024": (f"--model sam --slots 1024 --k 8 {MEMORY}", "all"),
    "sam-1048576": (f"--model sam --slots 1048576 --k 8 {MEMORY}", "own"),
    "sdnc-1024": (f"--model sdnc --slots 1024 --k 8 {MEMORY}", "ends"),
    "dnc-1024": (f"--model dnc --slots 1024 {MEMORY}", "own"),
    "lstm": ("--model lstm", "own"),
}
"""The runs by name: (their options, the N they are scored at: all of --slots, its smallest and
largest, or their own). SAM trained at N = 2^10 is scored at every N; SAM trained at N = 2^20 itself
at that N; SDNC at the two ends; the DNC at the N it trained with (its N x N links rule out a
million slots); the LSTM has no memory."""


def model_of(name: str) -> str:
    return name.split("-")[0]


def cells(runs: list[str], slots: list[int], pairs: list[int]) -> list[tuple[str, int | None, int]]:
    """(run, N or None: the run's own, pairs) to evaluate."""
    grid = []
    for run in runs:
        sizes = {"all": slots, "ends": sorted({min(slots), max(slots)}), "own": [None]}[RUNS[run][1]]
        grid += [(run, n, p) for n in sizes for p in pairs]
    return grid


def evaluate_cell(root: Path, run: str, num_slots: int | None, pairs: int, answers: int, batch_size: int) -> dict:
    """`python -m sparsemem.evaluate` of one cell, its JSON read back (computed once: kept under
    root/evaluations)."""
    options = ["--level", str(pairs), "--final-queries", str(math.ceil(answers / batch_size))]
    options += ["--episodes", str(batch_size), "--batch-size", str(batch_size)]
    options += ["--slots", str(num_slots)] if num_slots is not None else []
    out = root / "evaluations" / f"{run}-N{num_slots or 'run'}-P{pairs}.json"
    result = evaluate_once(root / run, out, options)
    print(f"{run} N={result['slots']} pairs={pairs}: error {result['error']:.4f}", flush=True)
    return result


def logged_metrics(out: Path) -> list[dict]:
    """A run's metrics.jsonl: one record per logged step."""
    return [json.loads(line) for line in (out / METRICS).read_text().splitlines()]


def training_summary(out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    keep = ("steps", "steps_to_threshold", "train_seconds", "stopped_by", "sequences_per_second", "final_query_error")
    metrics = logged_metrics(out)
    return {key: summary.get(key) for key in keep} | {"top_level": metrics[-1]["top_level"] if metrics else None}


def table(results: dict, pairs: list[int], minutes: float) -> str:
    lines = [
        f"Key-value recall (64-bit keys, 8-bit values), trained {minutes:g} minutes each on 8 to 128 pairs; "
        "error: the fraction of the final queries' value bits wrong (chance: 50%).",
        "",
        "| run | trained N | steps (to threshold) | evaluated N | " + " | ".join(f"{p:,} pairs" for p in pairs) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(pairs),
    ]
    for run, entry in results["runs"].items():
        train = entry["training"]
        reached = train["steps_to_threshold"]
        steps = f"{train['steps']:,} ({reached:,})" if reached is not None else f"{train['steps']:,} (not reached)"
        for size, row in entry["errors"].items():
            errors = " | ".join(f"{100 * row[str(p)]:.1f}%" for p in pairs)
            trained = entry["trained_slots"]
            shown = "none" if trained is None else log2_label(int(size))
            lines.append(
                f"| {run} | {'none' if trained is None else log2_label(trained)} | {steps} | {shown} | {errors} |"
            )
    return "\n".join(lines) + "\n"


def plot_errors(results: dict, pairs: list[int], path: Path) -> None:
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    styles = {"sam": "-", "sdnc": "--", "dnc": ":", "lstm": "-."}
    for run, entry in results["runs"].items():
        for size, row in entry["errors"].items():
            points = [(p, 100 * row[str(p)]) for p in pairs]
            label = f"{run}, N={log2_label(int(size))}" if entry["trained_slots"] is not None else run
            axis.plot(*zip(*points, strict=True), styles[model_of(run)], marker="o", label=label)
    axis.axhline(50, color="gray", lw=1, ls=":", label="chance")
    axis.set_xscale("log")
    axis.set_xlabel("pairs stored in the episode")
    axis.set_ylabel("final queries: value bits wrong (%)")
    axis.set_title("Key-value recall: the same weights with memories of N slots")
    axis.legend(fontsize=7, ncol=2)
    save_figure(figure, path, dpi=120)


def smooth(values: list[float], window: int = 10) -> list[float]:
    """The mean of each value and the window - 1 before it (a batch's error is noisy: levels are drawn)."""
    sums = [0.0, *itertools.accumulate(values)]
    return [(sums[i + 1] - sums[max(0, i + 1 - window)]) / min(i + 1, window) for i in range(len(values))]


def plot_curves(root: Path, runs: list[str], path: Path) -> None:
    """Bits in error per sequence against training minutes, and the curriculum's top level."""
    plt = pyplot()
    figure, (errors, levels) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        metrics = logged_metrics(root / run)
        minutes, seconds, previous = [], 0.0, 0
        for record in metrics:  # one record every --log-every steps: its step's time stands for theirs
            seconds += record["step_seconds"] * (record["step"] - previous)
            previous = record["step"]
            minutes.append(seconds / 60)
        errors.plot(minutes, smooth([r["bits_error"] for r in metrics]), lw=1, label=run)
        levels.plot(minutes, [r["top_level"] for r in metrics], lw=1.5, label=run)
    errors.set_yscale("symlog", linthresh=0.1)
    errors.set_xlabel("training minutes (from the logged step times)")
    errors.set_ylabel("bits wrong per episode (mean of 10 logged batches)")
    levels.set_xlabel("training minutes (from the logged step times)")
    levels.set_ylabel("curriculum's top level (pairs)")
    levels.set_yscale("log", base=2)
    for axis in (errors, levels):
        axis.legend(fontsize=8)
    figure.suptitle("Learning key-value recall: SAM at N = 2^10 and at N = 2^20, SDNC, DNC, LSTM")
    save_figure(figure, path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.kv_scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/kv-scale"), help="the run folders' parent")
    parser.add_argument("--only", nargs="+", choices=list(RUNS), default=list(RUNS), help="the runs to train and score")
    parser.add_argument("--minutes", type=float, default=25.0, help="training minutes per run (<= 60)")
    parser.add_argument("--slots", nargs="+", type=int, default=[2**10, 2**14, 2**17, 2**20])
    parser.add_argument("--pairs", nargs="+", type=int, default=[1000, 10_000, 100_000])
    parser.add_argument("--answers", type=int, default=256, help="final queries scored per cell")
    parser.add_argument("--batch-size", type=int, default=1, help="episodes per cell, run together")
    parser.add_argument("--options", default="", help="more train options for every run (as one string)")
    parser.add_argument("--jobs", type=int, default=1, help="processes at once, one thread each")
    parser.add_argument("--results", type=Path, default=RESULTS / "learning", help="where the table and plots go")
    args = parser.parse_args(argv)
    for name in ("minutes", "answers", "batch_size", "jobs"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be positive; got {getattr(args, name)}")
    started, load_before = time.perf_counter(), os.getloadavg()
    base = [*shlex.split(COMMON), "--threads", "1", "--time-budget", str(args.minutes)]
    # the last of a repeated option counts: --options override the run's own
    trainings = {
        name: (args.runs / name, [*base, *shlex.split(RUNS[name][0]), *shlex.split(args.options)]) for name in args.only
    }
    run_trainings(trainings, args.minutes, args.jobs)

    grid = cells(args.only, sorted(args.slots), sorted(args.pairs))
    with ThreadPoolExecutor(args.jobs) as pool:  # each cell is its own process: threads only wait
        scored = list(pool.map(lambda cell: evaluate_cell(args.runs, *cell, args.answers, args.batch_size), grid))
    runs = {}
    for (run, _, pairs), result in zip(grid, scored, strict=True):
        entry = runs.setdefault(
            run,
            {
                "training": training_summary(args.runs / run),
                "trained_slots": result["trained_slots"] if model_of(run) != "lstm" else None,
                "errors": {},
                "ms_per_step": {},
            },
        )
        size = str(result["slots"])
        entry["errors"].setdefault(size, {})[str(pairs)] = result["error"]
        entry["ms_per_step"].setdefault(size, {})[str(pairs)] = result["ms_per_step"]
    config = {
        "common": COMMON,
        "options": args.options,
        "runs": {name: {"options": RUNS[name][0], "scored_at": RUNS[name][1]} for name in args.only},
        "minutes_per_run": args.minutes,
        "slots": sorted(args.slots),
        "pairs": sorted(args.pairs),
        "answers": args.answers,
        "batch_size": args.batch_size,
        "jobs": args.jobs,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "wall_seconds": time.perf_counter() - started,
    }
    results = header(config) | {"runs": runs}
    write_json(args.results / "kv-scale.json", results)
    text = table(results, sorted(args.pairs), args.minutes)
    write_text(args.results / "kv-scale.md", text)
    plot_errors(results, sorted(args.pairs), args.results / "kv-scale.png")
    plot_curves(args.runs, args.only, args.results / "kv-scale-curves.png")
    print(text)
    return results


if __name__ == "__main__":
    main()
