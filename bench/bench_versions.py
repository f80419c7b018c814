"""What state values cost: going back T steps to an older state, against T and N, and the memory
of a long no-grad stream (DESIGN.md, "States are values").

    python -m bench.bench_versions                    # SAM and SDNC, N = 2^10 .. 2^20, T up to 256
    python -m bench.bench_versions --stream-steps 100000

Rollback: a state S_0, then T steps from it (the storage now holds S_T). Stepping from S_0 again
first undoes the T steps (rows, index, LRU, links), stepping from S_T again redoes them. Each
move is timed on its own (the checkout a step from that state begins with; median over
repeats), beside a plain step: O(rows written in the T steps), the same at every N.

Stream: `y, state = model(x_t, state)` under no_grad, one step a call, dropping the old states:
the resident memory must stay flat (what is kept for going back is bounded by the oldest state
held).
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

import sparsemem as sm
from bench.common import (
    RESULTS,
    header,
    log2_label,
    log_axes,
    measured_median,
    pyplot,
    rss_bytes,
    save_figure,
    write_json,
)

MODELS = {"sam": sm.SAM, "sdnc": sm.SDNC}
CONFIG = {"batch": 8, "input_size": 32, "hidden_size": 128, "word_size": 64, "num_reads": 4, "k": 8}


def make(name: str, num_slots: int) -> torch.nn.Module:
    torch.manual_seed(0)
    c = CONFIG
    return MODELS[name](
        c["input_size"],
        c["hidden_size"],
        num_slots=num_slots,
        word_size=c["word_size"],
        num_reads=c["num_reads"],
        k=c["k"],
    )


@torch.no_grad()
def rollback(name: str, num_slots: int, steps: int, repeats: int) -> dict:
    """(undo ms, redo ms) of T = steps steps at N = num_slots, and a plain step's ms beside them."""
    model = make(name, num_slots)
    x = torch.randn(CONFIG["batch"], steps, CONFIG["input_size"], generator=torch.Generator().manual_seed(1))
    one = x[:, :1]
    _, start = model(one, model.init_state(CONFIG["batch"]))  # S_0 has rows written
    _, end = model(x, start)  # S_T: the storage holds it
    timeline = end.access.timeline
    undo, redo, plain = [], [], []
    for _ in range(repeats):
        undo.append(moving_seconds(timeline, start))  # S_T -> S_0: undo T steps
        redo.append(moving_seconds(timeline, end))  # S_0 -> S_T: redo them
        started = time.perf_counter()
        model(one, end)  # a plain step from the state the storage holds
        plain.append(time.perf_counter() - started)
        timeline.checkout(end.access.version.version)
    return {
        "model": name,
        "N": num_slots,
        "T": steps,
        "step_ms": 1e3 * measured_median(plain),
        "undo_ms": 1e3 * measured_median(undo),
        "redo_ms": 1e3 * measured_median(redo),
        "load_average": os.getloadavg()[0],
    }


def moving_seconds(timeline, state) -> float:
    """Seconds to bring the storage to `state`'s version: what stepping from it adds to a step."""
    started = time.perf_counter()
    timeline.checkout(state.access.version.version)
    return time.perf_counter() - started


@torch.no_grad()
def stream(name: str, num_slots: int, steps: int) -> dict:
    """Resident memory over a no-grad stream of one-step calls that drop their old states."""
    model = make(name, num_slots)
    generator = torch.Generator().manual_seed(2)
    state = model.init_state(CONFIG["batch"])
    points, every = [], max(1, steps // 50)
    started = time.perf_counter()
    for step in tqdm(range(steps), desc=f"{name} stream", unit="step", mininterval=5):
        x = torch.randn(CONFIG["batch"], 1, CONFIG["input_size"], generator=generator)
        _, state = model(x, state)
        if step % every == 0 or step == steps - 1:
            versions, rows = state.access.timeline.retained()
            point = {"step": step + 1, "rss_mb": rss_bytes() / 2**20, "retained_versions": versions}
            points.append(point | {"retained_rows": rows, "load_average": os.getloadavg()[0]})
    return {"model": name, "N": num_slots, "steps": steps, "seconds": time.perf_counter() - started, "rss": points}


def plot(rollbacks: list[dict], streams: list[dict], path) -> None:
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for (name, num_slots), style in zip(
        sorted({(r["model"], r["N"]) for r in rollbacks}), [f"C{i}" for i in range(20)], strict=False
    ):
        rows = [r for r in rollbacks if r["model"] == name and r["N"] == num_slots]
        line = "-" if name == "sam" else "--"
        left.plot([r["T"] for r in rows], [max(r["undo_ms"], 1e-3) for r in rows], line, color=style, marker="o",
                  label=f"{name} N={log2_label(num_slots)}")  # fmt: skip
    log_axes(left, "going back T steps (undo), ms", x_label="T (steps undone)")
    left.legend(fontsize=7)
    for run in streams:
        right.plot([p["step"] for p in run["rss"]], [p["rss_mb"] for p in run["rss"]], label=run["model"])
    right.set_title(f"no-grad stream, N={log2_label(streams[0]['N'])}: resident memory")
    right.set_xlabel("steps")
    right.set_ylabel("RSS (MiB)")
    right.grid(True, alpha=0.3)
    right.legend()
    figure.tight_layout()
    save_figure(figure, path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_versions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", choices=["rollback", "stream"], default=["rollback", "stream"],
                        help="what to run; a part not run is kept from the existing --out file")  # fmt: skip
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["sam", "sdnc"])
    parser.add_argument("--log2-slots", nargs="+", type=int, default=[10, 14, 17, 20], help="N = 2^each")
    parser.add_argument("--steps", nargs="+", type=int, default=[4, 16, 64, 256], help="T, steps gone back")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--stream-steps", type=int, default=20000, help="length of the no-grad stream")
    parser.add_argument("--stream-log2-slots", type=int, default=14)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "versions"), help="stem of the .json and .png written")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    stem = Path(args.out)
    kept = json.loads(stem.with_suffix(".json").read_text()) if stem.with_suffix(".json").exists() else {}
    result = {"rollback": kept.get("rollback", []), "stream": kept.get("stream", [])}
    result["headers"] = kept.get("headers", {}) | {part: header(vars(args) | {"model": CONFIG}) for part in args.parts}

    def save() -> None:  # after each case: a run stopped part-way keeps what it measured
        write_json(stem.with_suffix(".json"), result)

    if "rollback" in args.parts:
        result["rollback"] = []
        for name in args.models:
            for log2 in args.log2_slots:
                for steps in args.steps:
                    row = rollback(name, 2**log2, steps, args.repeats)
                    print(
                        f"{name:5} N=2^{log2:<2} T={steps:<4} step {row['step_ms']:7.2f} ms  "
                        f"undo {row['undo_ms']:7.2f} ms  redo {row['redo_ms']:7.2f} ms"
                    )
                    result["rollback"].append(row)
                    save()
    if "stream" in args.parts:
        result["stream"] = []
        for name in args.models:
            run = stream(name, 2**args.stream_log2_slots, args.stream_steps)
            first, last, seconds = run["rss"][0]["rss_mb"], run["rss"][-1]["rss_mb"], run["seconds"]
            print(f"{name:5} stream of {args.stream_steps} steps: RSS {first:.0f} -> {last:.0f} MiB ({seconds:.0f} s)")
            result["stream"].append(run)
            save()
    if result["rollback"] and result["stream"]:
        plot(result["rollback"], result["stream"], stem.with_suffix(".png"))
    return result


if __name__ == "__main__":
    main()
