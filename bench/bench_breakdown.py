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

Per-step profile (issue 18), `--profile`: SAM, SDNC and DNC forward and backward per step at
PROFILE_CONFIG (B = 8, X = 32, LSTM 128, W = 64, R = 4, K = 8, K_L = 8, T = 16, 2 threads):

    python -m bench.bench_breakdown --profile                  # the cases of PROFILE_CASES
    python -m bench.bench_breakdown --profile --cases sam:10   # one case

A case is model:log2 N[:regime[:index]]; by default N = 2^10 fresh (a new memory each
episode) and N = 2^20 full (every slot preloaded with clustered words and indexed once, with
faiss-ivf; recall@8 of the index against an exact search over the same rows, for queries near
stored words, is reported beside the time). Each case runs in its own process. Per step:
  - forward and backward ms: medians over the timed episodes (perf_counter around the forward
    and the backward of one T-step episode, divided by T), no profiler attached;
  - ops: the torch operators dispatched (a TorchDispatchMode counting every call that reaches
    a kernel, custom sparsemem ops counted once), forward and backward;
  - kernel ms: the share of the self CPU time of the operator events (aten::, sparsemem::) in
    one episode's forward (backward) under torch.profiler, applied to the unprofiled time (the
    profiler slows what it records); "python ms" is the rest: the interpreter, autograd
    bookkeeping and dispatch between the kernels.
Writes bench/results/breakdown/profile.json and profile.md.
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sparsemem as sm
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
from sparsemem.index.memories import recall

PROFILE_CONFIG = dict(batch=8, input_size=32, hidden=128, word_size=64, num_reads=4, k=8, link_k=8, steps=16)
PROFILE_CASES = ("sam:10", "sdnc:10", "dnc:10", "sam:20", "sdnc:20")
"""model:log2 N; N = 2^20 runs the full regime with faiss-ivf, the rest a fresh memory."""
PROFILE_DIR = RESULTS / "breakdown"

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


def parse_case(case: str) -> tuple[str, int, str, str]:
    """ "model:log2N[:regime[:index]]" -> (model, log2 N, regime, index); by default 2^20 and up
    are full with faiss-ivf, smaller N fresh with faiss-ivf (the dense DNC has no index)."""
    name, log2_slots, *rest = case.split(":")
    log2_slots = int(log2_slots)
    regime = rest[0] if rest else ("full" if log2_slots >= 20 else "fresh")
    index = rest[1] if len(rest) > 1 else ("none" if name == "dnc" else "faiss-ivf")
    return name, log2_slots, regime, index


def _profile_model(name: str, num_slots: int, index: str) -> torch.nn.Module:
    c = PROFILE_CONFIG
    options = dict(num_slots=num_slots, word_size=c["word_size"], num_reads=c["num_reads"])
    if name != "dnc":
        options.update(k=c["k"], index=index)
    if name == "sdnc":
        options["link_k"] = c["link_k"]
    cls = {"sam": sm.SAM, "sdnc": sm.SDNC, "dnc": sm.DNC}[name]
    return cls(c["input_size"], c["hidden"], output_size=c["input_size"], **options)


def _clustered_fill(state, seed: int = 1, clusters: int = 256, spread: float = 0.5) -> torch.Tensor:
    """The full regime on a realistic memory (index/memories.py: words around a few centres),
    generated chunk by chunk in place. -> the centres [B, clusters, W]."""
    generator = torch.Generator().manual_seed(seed)
    store = state.access.memory.store
    centres = torch.randn(store.batch, clusters, store.word_size, generator=generator)

    def words(b: int, first: int, end: int) -> torch.Tensor:
        members = torch.randint(0, clusters, (end - first,), generator=generator)
        return centres[b, members] + spread * torch.randn(end - first, store.word_size, generator=generator)

    store.preload(words)
    return centres


def _full_recall(state, k: int, heads: int, samples: int = 4, noise: float = 0.3) -> float:
    """recall@K of the state's index against an exact top-K over the same rows (ops.topk_content,
    one fused pass) for queries near stored words (index/memories.near_queries' recipe)."""
    store = state.access.memory.store
    rows = store.rows[: store.batch * store.num_slots].view(store.batch, store.num_slots, store.word_size)
    generator = torch.Generator().manual_seed(7)
    hits = []
    for _ in range(samples):
        picks = torch.randint(0, store.num_slots, (store.batch, heads), generator=generator)
        queries = rows.gather(1, picks.unsqueeze(-1).expand(-1, -1, store.word_size))
        queries = queries + noise * torch.randn(queries.shape, generator=generator)

        class _Exact:  # recall() asks both sides for search(queries, k)
            @staticmethod
            def search(q, k):
                with torch.no_grad():
                    return sm.ops.topk_content(rows, q, k)

        hits.append(recall(store.index, _Exact, queries, k))
    return sum(hits) / len(hits)


class _OpCounter(TorchDispatchMode):
    """Counts the operators dispatched to kernels (each custom sparsemem op once)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _kernel_ms(events) -> float:
    """Self CPU time of the operator events (aten::..., sparsemem::...), in ms."""
    return sum(e.self_cpu_time_total for e in events if "::" in e.name) / 1e3


def profile_case(name: str, log2_slots: int, regime: str, index: str, repeats: int) -> dict:
    """One process: the per-step profile of one model at one N (see the module docstring)."""
    torch.manual_seed(0)
    c = PROFILE_CONFIG
    T, batch = c["steps"], c["batch"]
    model = _profile_model(name, 1 << log2_slots, index)
    x = torch.randn(batch, T, c["input_size"], generator=torch.Generator().manual_seed(2))
    state, preload_seconds, recall_at_k = None, 0.0, None
    if regime == "full":
        state = model.init_state(batch)
        start = time.perf_counter()
        _clustered_fill(state)
        preload_seconds = time.perf_counter() - start
        recall_at_k = _full_recall(state, c["k"], c["num_reads"])

    def forward(state):
        y, state = model(x, state if regime == "full" else None)
        return y.square().mean(), state

    def backward(loss):
        loss.backward()
        model.zero_grad(set_to_none=True)

    loss, state = forward(state)  # warm-up
    backward(loss)
    state = state.detach()
    times = {"forward": [], "backward": []}
    for _ in range(repeats):
        start = time.perf_counter()
        loss, new_state = forward(state)
        middle = time.perf_counter()
        backward(loss)
        times["forward"].append((middle - start) / T)
        times["backward"].append((time.perf_counter() - middle) / T)
        state = new_state.detach()
    ops = {}
    with _OpCounter() as counter:
        loss, new_state = forward(state)
        ops["forward"] = counter.count / T
        backward(loss)
        ops["backward"] = counter.count / T - ops["forward"]
    state = new_state.detach()
    kernel = {}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        with region("forward"):
            loss, new_state = forward(state)
        with region("backward"):
            backward(loss)
    spans = {}
    for event in profile.events():
        if event.name in (PREFIX + "forward", PREFIX + "backward"):
            spans[event.name.removeprefix(PREFIX)] = event.time_range
    ms = {phase: 1e3 * measured_median(values) for phase, values in times.items()}
    for phase, span in spans.items():
        inside = [e for e in profile.events() if span.start <= e.time_range.start and e.time_range.end <= span.end]
        # the profiler slows every op it records: its share of the profiled phase, applied to the unprofiled time
        kernel[phase] = ms[phase] * min(1.0, _kernel_ms(inside) / (span.elapsed_us() / 1e3))
    return {
        "model": name,
        "log2_slots": log2_slots,
        "regime": regime,
        "index": index,
        "threads": torch.get_num_threads(),
        "ms_per_step": ms,
        "ms_per_step_best": {phase: 1e3 * min(values) for phase, values in times.items()},
        "ops_per_step": ops,
        "kernel_ms_per_step": kernel,
        "python_ms_per_step": {phase: max(0.0, ms[phase] - kernel[phase]) for phase in ms},
        "recall_at_k": recall_at_k,
        "preload_seconds": preload_seconds,
        "peak_rss_bytes": peak_rss_bytes(),
        "load_average": os.getloadavg()[0],
    }


def profile_markdown(results: list[dict], config: dict) -> str:
    """The README's table: per step, forward / backward, time, ops, kernel and Python time."""
    lines = [
        "# Per-step profile: SAM, SDNC and DNC forward / backward",
        "",
        f"Config: {json.dumps(config)}. ms: median per step without a profiler; ops: operators "
        "dispatched per step; kernel: operator self time under torch.profiler; python: ms less kernel.",
        "",
        "| model | N | regime, index | recall@K | fwd+bwd ms | fwd / bwd ms | ops fwd / bwd | "
        "kernel ms fwd / bwd | python ms fwd / bwd | load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {' '.join(r['args'][-4:])} | failed: {r['error']} |")
            continue
        ms, ops, kernel, python = (
            r[key] for key in ("ms_per_step", "ops_per_step", "kernel_ms_per_step", "python_ms_per_step")
        )
        recall_cell = "" if r["recall_at_k"] is None else f"{r['recall_at_k']:.3f}"
        pair = lambda d, f: f"{d['forward']:{f}} / {d['backward']:{f}}"  # noqa: E731
        lines.append(
            f"| {r['model'].upper()} | 2^{r['log2_slots']} | {r['regime']}, {r['index']} | {recall_cell} | "
            f"{ms['forward'] + ms['backward']:.2f} | {pair(ms, '.2f')} | {pair(ops, '.0f')} | "
            f"{pair(kernel, '.2f')} | {pair(python, '.2f')} | {r['load_average']:.1f} |"
        )
    return "\n".join(lines) + "\n"


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
    parser.add_argument("--threads", type=int, help="torch's and faiss's threads (default 1; --profile: 2)")
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help="the per-step profile (issue 18) instead")
    parser.add_argument(
        "--cases", nargs="+", default=list(PROFILE_CASES), help="--profile: model:log2N[:regime[:index]]"
    )
    parser.add_argument("--profile-one", help=argparse.SUPPRESS)
    parser.add_argument(
        "--out", help="the results' JSON (default bench/results/breakdown.json; --profile: breakdown/profile.json)"
    )
    parser.add_argument("--plot-only", action="store_true", help="redraw the table and plot from --out")
    args = parser.parse_args()
    if args.profile or args.profile_one:
        profile_main(args)
        return
    args.threads = args.threads or 1
    torch.set_num_threads(args.threads)
    if args.one:
        sm.keep_freed_memory()  # as training runs: large tensors reuse freed pages
        name, log2_slots, index = args.one
        print(json.dumps(run_case(name, int(log2_slots), index, args.repeats)))
        return
    out = Path(args.out or RESULTS / "breakdown.json")
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


def profile_main(args: argparse.Namespace) -> None:
    threads = args.threads or 2
    torch.set_num_threads(threads)
    os.environ["SPARSEMEM_THREADS"] = str(threads)  # faiss's threads too (load_faiss reads it)
    if args.profile_one:
        sm.keep_freed_memory()  # as training runs: large tensors reuse freed pages
        print(json.dumps(profile_case(*parse_case(args.profile_one), args.repeats)))
        return
    results = []
    for case in args.cases:
        results.append(
            run_module(
                "bench.bench_breakdown",
                ["--threads", str(threads), "--repeats", str(args.repeats), "--profile-one", case],
            )
        )
        print(json.dumps(results[-1]), flush=True)
    config = {**PROFILE_CONFIG, "threads": threads, "repeats": args.repeats}
    out = Path(args.out or PROFILE_DIR / "profile.json")
    print(write_json(out, {"header": header(config), "results": results}))
    table = profile_markdown(results, config)
    write_text(out.with_suffix(".md"), table)
    print(table)


if __name__ == "__main__":
    main()
