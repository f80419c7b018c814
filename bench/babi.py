"""bAbI result tables: a memory model and the LSTM baseline trained at the same time budget,
scored on the test files, beside the published columns.

    python -m bench.babi --data-dir ~/data/tasks_1-20_v1-2 --per-task 1,2,3 --minutes 10
    python -m bench.babi --data-dir ~/data/tasks_1-20_v1-2 --joint --minutes 90

Each run is `python -m sparsemem.train --task babi ...` in its own process, with its own run
folder under --runs; the memory model's run and the LSTM's run of one table row go side by
side (one thread each), so both see the same machine. A run folder that already holds a
checkpoint is continued with --resume (the budget adds up across sessions), and one whose
summary says its budget is spent is only read. The options shared by both models (--common)
and each model's own (--memory-options, --lstm-options) are train's flags, chosen on the
validation stories (train holds out 10% of each task's training stories), never on the test
files. Writes bench/results/babi/<name>.json, .md and .png.
"""

import argparse
import json
import os
import shlex
import time
from pathlib import Path

from bench.common import (
    RESULTS,
    TRAIN_COMMANDS,
    header,
    pyplot,
    run_trainings,
    save_figure,
    trained_at,
    write_json,
    write_text,
)

# fmt: off
PUBLISHED = {
    # Test error (%) per task, 10k training, jointly trained, best run: Graves et al. 2016
    # (Nature 538), Extended Data Table 1 (LSTM, DNC "DNC2") and its MemN2N column (Sukhbaatar
    # et al. 2015). SDNC: Rae et al. 2016 report its mean only (2.9%, best run).
    "LSTM": [24.5, 53.2, 48.3, 0.4, 3.5, 11.5, 15.0, 16.5, 10.5, 22.9,
             6.1, 3.8, 0.5, 55.3, 44.7, 52.6, 39.2, 4.8, 89.5, 1.3],
    "MemN2N": [0.0, 1.0, 6.8, 0.0, 6.1, 0.1, 6.6, 2.7, 0.0, 0.5,
               0.0, 0.1, 0.0, 0.0, 0.2, 0.2, 41.8, 8.0, 75.7, 0.0],
    "DNC": [0.0, 0.4, 1.8, 0.0, 0.8, 0.0, 0.6, 0.3, 0.2, 0.2,
            0.0, 0.0, 0.1, 0.4, 0.0, 55.1, 12.0, 0.8, 3.9, 0.0],
}
# fmt: on
PUBLISHED_MEAN = {"LSTM": 25.2, "MemN2N": 7.5, "DNC": 3.8, "SDNC": 2.9}
PASSED = 0.05
"""A task counts as passed below this test error (Weston et al. 2015)."""


def read_run(out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    keep = ("model", "hidden_size", "embedding_size", "num_slots", "word_size", "num_reads", "k", "batch_size", "lr")
    config = summary["config"]
    return {
        "commands": (out / TRAIN_COMMANDS).read_text().splitlines(),
        # dropout: 0 for runs from before --dropout existed
        "config": {key: config[key] for key in keep} | {"dropout": config.get("dropout", 0.0)},
        "steps": summary["steps"],
        "stopped_by": summary["stopped_by"],
        "sessions": summary.get("sessions", []),
        **summary["babi"],
    }


def task_labels(run: dict) -> dict[str, str]:
    """A run's tasks in order, each labelled with its number and a * if it trained on the 1k fallback."""
    return {task: task + ("*" if task in run["fallback"] else "") for task in sorted(run["tasks"], key=int)}


def table(rows: list[tuple[dict, dict]], memory: str) -> str:
    """Markdown: per task, our memory model's and our LSTM's test error (%) beside the
    published LSTM, MemN2N and DNC; then the mean and the tasks passed."""
    lines = [
        f"| task | ours: {memory} | ours: LSTM | LSTM (published) | MemN2N (published) | DNC (published) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for ours, baseline in rows:
        for task, label in task_labels(ours).items():
            published = [PUBLISHED[column][int(task) - 1] for column in ("LSTM", "MemN2N", "DNC")]
            ours_error, lstm_error = ours["tasks"][task]["error"] * 100, baseline["tasks"][task]["error"] * 100
            cells = [f"{ours_error:.1f}", f"{lstm_error:.1f}", *(f"{value:.1f}" for value in published)]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        if len(ours["tasks"]) > 1:
            published = [f"{PUBLISHED_MEAN[column]:.1f}" for column in ("LSTM", "MemN2N", "DNC")]
            cells = [f"{ours['mean_error'] * 100:.1f}", f"{baseline['mean_error'] * 100:.1f}", *published]
            lines.append("| mean | " + " | ".join(cells) + " |")
            counts = [str(ours["tasks_passed"]), str(baseline["tasks_passed"])]
            counts += [str(sum(value < PASSED * 100 for value in PUBLISHED[c])) for c in ("LSTM", "MemN2N", "DNC")]
            lines.append("| passed (< 5%) | " + " | ".join(counts) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[tuple[dict, dict]], memory: str, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    bars = [
        (
            label,
            ours["tasks"][task]["error"] * 100,
            baseline["tasks"][task]["error"] * 100,
            PUBLISHED["DNC"][int(task) - 1],
        )
        for ours, baseline in rows
        for task, label in task_labels(ours).items()
    ]
    labels, ours, lstm, published = zip(*bars, strict=True)
    figure, axis = plt.subplots(figsize=(max(5, 0.45 * len(labels) + 2), 3.5))
    positions = range(len(labels))
    for offset, values, name in (
        (-0.27, ours, f"ours: {memory}"),
        (0, lstm, "ours: LSTM"),
        (0.27, published, "DNC (published)"),
    ):
        axis.bar([p + offset for p in positions], values, width=0.27, label=name)
    axis.axhline(PASSED * 100, color="gray", ls="--", lw=1, label="passed: < 5%")
    axis.set_xticks(list(positions), labels)
    axis.set_xlabel("bAbI task")
    axis.set_ylabel("test error (%)")
    axis.legend(fontsize=8)
    save_figure(figure, path, dpi=100)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.babi", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="the bAbI release (as train's --data-dir)")
    parser.add_argument("--babi-set", default="en-10k", choices=("en", "en-10k"))
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--per-task", help="one model per task, for these tasks (as 1,2,3)")
    which.add_argument("--joint", action="store_true", help="one model for all 20 tasks")
    parser.add_argument("--minutes", type=float, required=True, help="training budget of each run")
    parser.add_argument("--model", default="dnc", choices=("dnc", "sdnc", "sam", "ntm"), help="the memory model")
    parser.add_argument("--common", default="", help="train options both models get (as one string)")
    parser.add_argument("--memory-options", default="", help="train options only the memory model gets")
    parser.add_argument("--lstm-options", default="", help="train options only the LSTM gets")
    parser.add_argument("--runs", type=Path, default=Path("runs/babi"), help="the run folders' parent")
    parser.add_argument("--name", help="the results' file stem (default: per-task or joint, and the set)")
    parser.add_argument("--results", type=Path, default=RESULTS / "babi", help="where the tables go")
    args = parser.parse_args(argv)
    tasks = ["all"] if args.joint else args.per_task.split(",")
    name = args.name or f"{'joint' if args.joint else 'per-task'}-{args.babi_set}"
    base = ["--task", "babi", "--data-dir", args.data_dir, "--babi-set", args.babi_set, "--babi-fallback-1k"]
    base += ["--time-budget", str(args.minutes), "--threads", "1", "--steps", "100000000"]
    base += shlex.split(args.common)
    load_before = os.getloadavg()
    started = time.perf_counter()
    rows, runs = [], {}
    for task in tasks:
        pair = {}
        for model, extra in ((args.model, args.memory_options), ("lstm", args.lstm_options)):
            out = args.runs / f"{name}-{model}-{task}"
            pair[model] = (out, [*base, "--babi-tasks", task, "--model", model, *shlex.split(extra)])
        run_trainings(pair, args.minutes, jobs=len(pair))  # side by side: both see the same machine
        ours, baseline = (read_run(pair[model][0]) for model in (args.model, "lstm"))
        rows.append((ours, baseline))
        runs[task] = {args.model: ours, "lstm": baseline}
    config = {
        "babi_set": args.babi_set,
        "tasks": tasks,
        "minutes_per_run": args.minutes,
        "model": args.model,
        "common": args.common,
        "memory_options": args.memory_options,
        "lstm_options": args.lstm_options,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "wall_seconds": time.perf_counter() - started,
    }
    result = header(config) | {"runs": runs, "published": PUBLISHED, "published_mean": PUBLISHED_MEAN}
    out = args.results
    write_json(out / f"{name}.json", result)
    text = table(rows, args.model)
    if any(ours["fallback"] for ours, _ in rows):
        text += "\n\\* trained on en/'s 1k training file (en-10k has none for this task).\n"
    if provenance := trained_at([run for pair in rows for run in pair]):
        text += "\n" + provenance
    write_text(out / f"{name}.md", text)
    plot(rows, args.model, out / f"{name}.png")
    print(text)
    return result


if __name__ == "__main__":
    main()
