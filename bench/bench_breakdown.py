"""End to end: SAM and SDNC forward+backward per step in the full regime, the default backends
against SPARSEMEM_BACKEND=torch, and where a step's time goes.

    python -m bench.bench_breakdown                          # N = 2^16 and 2^20, SAM and SDNC, both backends
    python -m bench.bench_breakdown --log2-slots 16          # the quick run
    python -m bench.bench_breakdown --log2-slots 20 --index faiss-ivf

Config: bench/bench_sparse.py's CONFIG (B = 8, W = 64, R = 4, K = 8, K_L = 8, T = 16, LSTM 128)
and its full regime (every slot preloaded with a random unit word and indexed once; the
preload is timed on its own). Every (model, N, backend) case runs in its own process, the
torch cases with SPARSEMEM_BACKEND=torch in their environment. "Per step" is the median time
of one T-step forward+backward (after a warm-up episode) divided by T, without a profiler.

Breakdown: one more episode runs under torch.profiler; the regions of sparsemem._profiling
(index search, index update/merges, controller, memory write, read, links, LRU) and the
backward pass are timed exclusive of the regions nested in them (an index update inside a
memory write counts as index update); "other" is the rest of the episode (the model's loop
and glue). Shares come from the profiled episode; milliseconds are those shares of the
unprofiled step time, since the profiler's own overhead inflates small ops. On a shared
machine the best episode (min) is reported beside the median, with the load average.

Writes bench/results/breakdown.json, breakdown.md (tables) and breakdown.png (stacked bars).
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch

from bench.bench_sparse import CONFIG, build_model, fill
from bench.common import (
    RESULTS,
    header,
    measured_median,
    peak_rss_bytes,
    pyplot,
    run_module,
    save_figure,
    write_json,
    write_text,
)
from sparsemem._profiling import PREFIX, region

CATEGORIES = (
    "index.search",
    "index.update",
    "controller",
    "memory.write",
    "memory.read",
    "memory.links",
    "memory.lru",
    "backward",
    "other",
)
BACKENDS = ("default", "torch")
EPISODE = "episode"


def _episode(model: torch.nn.Module, x: torch.Tensor, state):
    with region(EPISODE):
        y, state = model(x, state)
        loss = y.square().mean()
        with region("backward"):
            loss.backward()
    model.zero_grad(set_to_none=True)
    return state.detach()


def _exclusive_ms(events) -> dict[str, float]:
    """Milliseconds per region, each without the regions nested inside it (a region's time goes
    to the innermost region around it)."""
    totals: dict[str, float] = {}
    for event in events:
        if not event.name.startswith(PREFIX):
            continue
        name = event.name.removeprefix(PREFIX)
        elapsed = event.time_range.elapsed_us() / 1e3
        totals[name] = totals.get(name, 0.0) + elapsed
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith(PREFIX):
            parent = parent.cpu_parent
        if parent is not None:
            outer = parent.name.removeprefix(PREFIX)
            totals[outer] = totals.get(outer, 0.0) - elapsed
    return totals


def run_case(name: str, log2_slots: int, index: str, repeats: int) -> dict:
    """One process: full-regime model, a warm-up episode, `repeats` timed episodes, one profiled."""
    torch.manual_seed(0)
    c = CONFIG
    model = build_model(name, 1 << log2_slots, index)
    state = model.init_state(c["batch"])
    start = time.perf_counter()
    fill(state)
    preload_seconds = time.perf_counter() - start
    x = torch.randn(c["batch"], c["steps"], c["input_size"], generator=torch.Generator().manual_seed(2))
    state = _episode(model, x, state)
    episodes = []
    for _ in range(repeats):
        start = time.perf_counter()
        state = _episode(model, x, state)
        episodes.append(time.perf_counter() - start)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        state = _episode(model, x, state)
    regions = _exclusive_ms(profile.events())
    profiled = regions.pop(EPISODE, 0.0) + sum(regions.values())  # the episode's total, nested regions added back
    shares = {category: 0.0 for category in CATEGORIES}
    for region_name, ms in regions.items():
        shares[region_name if region_name in shares else "other"] += ms / profiled
    shares["other"] += 1 - sum(shares.values())
    per_step = measured_median(episodes) / c["steps"]
    return {
        "load_average": os.getloadavg()[0],
        "model": name,
        "log2_slots": log2_slots,
        "index": index,
        "backend": os.environ.get("SPARSEMEM_BACKEND") or "default",
        "seconds_per_step": per_step,
        "episode_seconds": episodes,
        "preload_seconds": preload_seconds,
        "profiled_ms_per_step": profiled / c["steps"],
        "shares": shares,
        "ms_per_step": {category: share * per_step * 1e3 for category, share in shares.items()},
        "peak_rss_bytes": peak_rss_bytes(),
    }


def _in_process(backend: str, args: list[str]) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "SPARSEMEM_BACKEND"}
    if backend != "default":
        env["SPARSEMEM_BACKEND"] = backend
    result = run_module("bench.bench_breakdown", args, env)
    if "error" in result:
        result["backend"] = backend
    return result


def markdown(results: list[dict], config: dict) -> str:
    """One table per N: per-step time, torch/default ratio, then ms per step (share) per category."""
    lines = [
        "# SAM and SDNC forward+backward per step, full regime: default backends vs SPARSEMEM_BACKEND=torch",
        "",
        f"Config: {json.dumps(config)}. Categories: exclusive time of each profiled region, "
        "as its share of the unprofiled step time.",
    ]
    done = [r for r in results if "error" not in r]
    for log2_slots in sorted({r["log2_slots"] for r in done}):
        lines += ["", f"## N = 2^{log2_slots}", ""]
        head = "| model | backend | index | ms/step (median) | torch / default | ms/step (best) | torch / default |"
        lines.append(head + " load | " + " | ".join(CATEGORIES) + " |")
        lines.append("|---" * (8 + len(CATEGORIES)) + "|")
        for r in (r for r in done if r["log2_slots"] == log2_slots):
            torch_case = _find(done, r["model"], log2_slots, r["index"], "torch")
            ratios = ["", ""]
            if r["backend"] == "default" and torch_case is not None:
                ratios = [f"{_per_step(torch_case, f) / _per_step(r, f):.2f}x" for f in (measured_median, min)]
            cells = [f"{r['ms_per_step'][c]:.1f} ({100 * r['shares'][c]:.0f}%)" for c in CATEGORIES]
            times = [f"{1e3 * _per_step(r, f):.1f}" for f in (measured_median, min)]
            load = f"{r['load_average']:.1f}" if "load_average" in r else ""
            row = [r["model"].upper(), r["backend"], r["index"], times[0], ratios[0], times[1], ratios[1], load]
            lines.append("| " + " | ".join([*row, *cells]) + " |")
    for r in results:
        if "error" in r:
            lines.append(f"\nFailed: {r['backend']} {' '.join(r['args'])}: {r['error']}")
    return "\n".join(lines) + "\n"


def _per_step(result: dict, statistic) -> float:
    """Seconds per step: statistic (median or min) over the timed episodes, divided by T."""
    return statistic(result["episode_seconds"]) / CONFIG["steps"]


def _find(results: list[dict], model: str, log2_slots: int, index: str, backend: str) -> dict | None:
    for r in results:
        if (r["model"], r["log2_slots"], r["index"], r["backend"]) == (model, log2_slots, index, backend):
            return r
    return None


def plot(results: list[dict], path: Path) -> None:
    """Stacked bars of ms per step by category, one panel per N, a bar per (model, index, backend)."""
    plt = pyplot()
    done = [r for r in results if "error" not in r]
    sizes = sorted({r["log2_slots"] for r in done})
    figure, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 5), squeeze=False)
    colours = plt.get_cmap("tab10").colors
    for axis, log2_slots in zip(axes[0], sizes, strict=True):
        cases = [r for r in done if r["log2_slots"] == log2_slots]
        labels = [f"{r['model'].upper()}\n{r['backend']}\n{r['index']}" for r in cases]
        bottom = [0.0] * len(cases)
        for colour, category in zip(colours, CATEGORIES, strict=False):
            heights = [r["ms_per_step"][category] for r in cases]
            axis.bar(labels, heights, bottom=bottom, label=category, color=colour)
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        axis.set_title(f"N = 2^{log2_slots}, full regime")
        axis.set_ylabel("ms per step (forward + backward)")
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    save_figure(figure, path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["sam", "sdnc"], choices=["sam", "sdnc"])
    parser.add_argument("--log2-slots", nargs="+", type=int, default=[16, 20])
    parser.add_argument("--index", nargs="+", default=["exact"], help='"exact", "faiss-hnsw", "faiss-ivf"')
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS / "breakdown.json"))
    parser.add_argument("--plot-only", action="store_true", help="redraw the table and plot from --out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        name, log2_slots, index = args.one
        print(json.dumps(run_case(name, int(log2_slots), index, args.repeats)))
        return
    out = Path(args.out)
    if args.plot_only:
        saved = json.loads(out.read_text())
        results, config = saved["results"], saved["header"]["config"]
    else:
        results = []
        common = ["--threads", str(args.threads), "--repeats", str(args.repeats)]
        for log2_slots in args.log2_slots:
            for name in args.models:
                for index in args.index:
                    for backend in args.backends:
                        results.append(_in_process(backend, [*common, "--one", name, str(log2_slots), index]))
                        print(json.dumps(results[-1]), flush=True)
        config = {**CONFIG, "index": args.index, "threads": args.threads, "repeats": args.repeats}
        print(write_json(out, {"header": header(config), "results": results}))
    table = markdown(results, config)
    write_text(out.with_suffix(".md"), table)
    plot(results, out.with_suffix(".png"))
    print(table)


if __name__ == "__main__":
    main()
