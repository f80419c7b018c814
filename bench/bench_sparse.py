"""SAM and SDNC forward+backward: time per step, peak RSS and backward memory against N and T.

    python -m bench.bench_sparse                       # N = 2^10 and 2^20, fresh and full regimes
    python -m bench.bench_sparse --log2-slots 10 16 20 --regimes fresh --index exact
    python -m bench.bench_sparse --backward-memory     # saved-for-backward bytes vs T at N = 2^16, 2^20

Config (issue 6): B = 8, W = 64, R = 4, K = 8, K_L = 8, T = 16, LSTM controller of 128.
Every (model, N, regime) runs in its own process, so peak RSS (ru_maxrss) is per size.
Regimes (DESIGN.md "Two regimes"): fresh starts each episode from a reset memory; full
preloads every slot with random unit words (filled in place, chunk by chunk, and indexed
once: the index build is timed on its own) and carries the state across episodes.
"Per step" is the median time of one T-step forward+backward divided by T, with the buffer's
merges into the index counted in it and index rebuilds not: those are reported apart, in
total and amortised per timed step, beside the preload (filling the memory, then one
Index.load) and the index build within it.
"Saved for backward" sums the bytes autograd keeps for one T-step episode (saved tensor
hooks): the journal's O(T K W) rows and the controller's activations; it must not grow with N.
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch

import sparsemem as sm
from bench.common import (
    RESULTS,
    find_index,
    header,
    log_axes,
    measured_median,
    peak_rss_bytes,
    pyplot,
    rss_bytes,
    run_module,
    save_figure,
    write_json,
)

CONFIG = dict(batch=8, word_size=64, num_reads=4, k=8, link_k=8, steps=16, hidden=128, input_size=8)


def build_model(name: str, num_slots: int, index: str) -> sm.MemoryModel:
    c = CONFIG
    options = dict(num_slots=num_slots, word_size=c["word_size"], num_reads=c["num_reads"], k=c["k"], index=index)
    if name == "sdnc":
        options["link_k"] = c["link_k"]
    cls = sm.SAM if name == "sam" else sm.SDNC
    return cls(c["input_size"], c["hidden"], output_size=c["input_size"], **options)


def fill(state: sm.ModelState, seed: int = 1) -> None:
    """The full regime: every slot of a sparse model's state written with a random unit word
    (generated and indexed chunk by chunk, in place: no second copy of the memory)."""
    generator = torch.Generator().manual_seed(seed)

    def random_words(b: int, first: int, end: int) -> torch.Tensor:
        words = torch.randn(end - first, CONFIG["word_size"], generator=generator)
        return words / words.norm(dim=-1, keepdim=True)

    state.access.memory.store.preload(random_words)


def _saved_bytes(model: sm.MemoryModel, x: torch.Tensor, state) -> tuple[int, object]:
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        y, state = model(x, state)
    y.square().mean().backward()
    return total, state


def run_one(name: str, log2_slots: int, regime: str, index: str, repeats: int) -> dict:
    """One process: build, warm up, then time `repeats` episodes of T steps."""
    torch.manual_seed(0)
    c = CONFIG
    num_slots = 1 << log2_slots
    model = build_model(name, num_slots, index)
    rss_start = rss_bytes()
    start = time.perf_counter()
    state = model.init_state(c["batch"])
    preload_seconds = 0.0
    if regime == "full":
        fill(state)
        preload_seconds = time.perf_counter() - start
    preloaded = find_index(state).stats()
    x = torch.randn(c["batch"], c["steps"], c["input_size"], generator=torch.Generator().manual_seed(2))
    episode_seconds, saved, rebuilds, merges = [], [], [], []
    for episode in range(repeats + 1):
        if regime == "fresh":
            state = state.reset(torch.ones(c["batch"], dtype=torch.bool))
        index_before = find_index(state).stats()
        start = time.perf_counter()
        saved_bytes, state = _saved_bytes(model, x, state)
        elapsed = time.perf_counter() - start
        index_after = find_index(state).stats()
        model.zero_grad(set_to_none=True)
        state = state.detach()
        rebuild = index_after.build_seconds - index_before.build_seconds
        if episode:  # the first episode warms up
            episode_seconds.append(elapsed - rebuild)
            saved.append(saved_bytes)
            rebuilds.append(rebuild)
            merges.append(index_after.merge_seconds - index_before.merge_seconds)
    stats = find_index(state).stats()
    matrix = c["batch"] * num_slots * c["word_size"] * 4
    per_step = measured_median(episode_seconds) / c["steps"]
    timed_steps = len(episode_seconds) * c["steps"]
    return {
        "model": name,
        "log2_slots": log2_slots,
        "regime": regime,
        "index": index,
        "seconds_per_step": per_step,
        "seconds_per_step_best": min(episode_seconds) / c["steps"],  # least disturbed by other processes
        "episode_seconds": episode_seconds,
        "preload_seconds": preload_seconds,
        "index_build_seconds": preloaded.build_seconds,
        "index_rebuild_seconds_total": stats.build_seconds - preloaded.build_seconds,
        "index_rebuild_seconds_per_step": sum(rebuilds) / timed_steps,
        "index_rebuilds": stats.rebuilds - preloaded.rebuilds,
        "index_merge_seconds_total": stats.merge_seconds - preloaded.merge_seconds,
        "index_merge_seconds_per_step": sum(merges) / timed_steps,
        "index_bytes": stats.bytes,
        "memory_matrix_bytes": matrix,
        "peak_rss_bytes": peak_rss_bytes(),
        "rss_at_start_bytes": rss_start,
        "peak_rss_over_matrix": peak_rss_bytes() / matrix,
        "saved_for_backward_bytes": max(saved),
        "load_average": os.getloadavg(),  # at the end: a busy machine slows every timing above
    }


def backward_memory(name: str, log2_slots: int, steps: list[int]) -> dict:
    """Bytes autograd saves for one fresh T-step episode, for each T (no timing)."""
    torch.manual_seed(0)
    c = CONFIG
    model = build_model(name, 1 << log2_slots, "exact")
    saved = {}
    for length in steps:
        x = torch.randn(c["batch"], length, c["input_size"], generator=torch.Generator().manual_seed(2))
        saved[length], _ = _saved_bytes(model, x, model.init_state(c["batch"]))
    peak = peak_rss_bytes()
    return {"model": name, "log2_slots": log2_slots, "saved_for_backward_bytes": saved, "peak_rss_bytes": peak}


def plot(results: list[dict], path: Path) -> None:
    """ms per step, peak RSS over the memory matrix and the preload against N, one line per model and regime."""
    plt = pyplot()
    panels = [
        ("seconds_per_step", 1e3, "forward+backward ms per step", True),
        ("peak_rss_over_matrix", 1, "peak RSS / memory matrix (B N W float32)", True),
        ("preload_seconds", 1, "preload s (fill + index build)", True),
    ]
    timed = [r for r in results if "seconds_per_step" in r]
    lines = list(dict.fromkeys((r["model"], r["regime"]) for r in timed))
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for axis, (key, scale, title, log) in zip(axes, panels, strict=True):
        for model, regime in lines:
            rows = sorted(
                (r for r in timed if (r["model"], r["regime"]) == (model, regime)), key=lambda r: r["log2_slots"]
            )
            if key == "preload_seconds" and regime != "full":
                continue
            label = f"{model.upper()} {regime} ({rows[0]['index']})"
            axis.plot([1 << r["log2_slots"] for r in rows], [r[key] * scale for r in rows], marker="o", label=label)
        log_axes(axis, title, log_y=log)
    axes[0].legend()
    figure.tight_layout()
    save_figure(figure, path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["sam", "sdnc"], choices=["sam", "sdnc"])
    parser.add_argument("--log2-slots", nargs="+", type=int, default=[10, 20])
    parser.add_argument("--regimes", nargs="+", default=["fresh", "full"], choices=["fresh", "full"])
    parser.add_argument("--index", default="exact", help='"exact", "faiss-hnsw" or "faiss-ivf"')
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backward-memory", action="store_true", help="saved bytes vs T at N = 2^16, 2^20")
    parser.add_argument("--threads", type=int, default=1, help="torch and faiss threads (SPARSEMEM_THREADS)")
    parser.add_argument("--one", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS / "sparse.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # faiss too (load_faiss reads it): its OpenMP team on a busy 2-core machine turned steps of
    # ~30 ms into 190-500 ms when a search of R keys waited for a descheduled second thread.
    os.environ["SPARSEMEM_THREADS"] = str(args.threads)
    if args.one:
        kind, *rest = args.one
        if kind == "step":
            name, log2_slots, regime, index, repeats = rest
            result = run_one(name, int(log2_slots), regime, index, int(repeats))
        else:
            name, log2_slots, *steps = rest
            result = backward_memory(name, int(log2_slots), [int(length) for length in steps])
        print(json.dumps(result))
        return
    threads = ["--threads", str(args.threads)]
    load_at_start = os.getloadavg()
    results = []
    if args.backward_memory:
        for name in args.models:
            for log2_slots in (16, 20):
                one = ["memory", name, str(log2_slots), "4", "8", "16", "32"]
                results.append(run_module("bench.bench_sparse", [*threads, "--one", *one]))
                print(json.dumps(results[-1]), flush=True)
    else:
        for name in args.models:
            for regime in args.regimes:
                for log2_slots in args.log2_slots:
                    one = ["step", name, str(log2_slots), regime, args.index, str(args.repeats)]
                    results.append(run_module("bench.bench_sparse", [*threads, "--one", *one]))
                    print(json.dumps(results[-1]), flush=True)
    config = {**CONFIG, "index": args.index, "threads": args.threads, "repeats": args.repeats}
    config["load_average_at_start"] = load_at_start
    print(write_json(Path(args.out), {"header": header(config), "results": results}))
    if not args.backward_memory and any("seconds_per_step" in r for r in results):
        plot(results, Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
