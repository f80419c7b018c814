"""Index build, merge, update and search times, recall@K and memory vs N, in the full regime.

    python -m bench.bench_index [--full] [--indexes exact,faiss-hnsw,faiss-ivf] [--memory clustered]

Full regime: every one of the N slots of each batch row written. Per index and N:
- fill: wall time to write all N rows through update() (buffer + merges for faiss), then
  rebuild: time of one rebuild() from scratch of the filled index;
- merge: time per row of one merge of the exact buffer (buffer_rows overwritten rows) into
  the full index; update: time of one step's writes (J rows per batch row) into the buffer;
- search: K = 8 for R keys per batch row, with the buffer half full (the steady state);
- recall@K against ExactIndex on the same rows, over 256 keys per batch row near stored words;
- bytes: IndexStats.bytes.
The default goes to N = 2^16; --full to 2^20 (HNSW builds ~1 min per batch row there).
Writes bench/results/index.json (with header) and index.png, the JSON after every case,
so an interrupted run keeps what it measured (--plot-only redraws its PNG).
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from bench.common import RESULTS, header, time_cpu, write_json
from sparsemem.index import ExactIndex, make_index
from sparsemem.index.memories import clustered_words, near_queries, recall


def words_for(memory: str, batch_size: int, num_slots: int, word_size: int, seed: int) -> torch.Tensor:
    if memory == "clustered":
        # ~64 words per cluster at every N: neighbours as crowded at 2^20 as at 2^10
        return clustered_words(batch_size, num_slots, word_size, clusters=max(16, num_slots // 64), seed=seed)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, num_slots, word_size, generator=g)


def run_case(name: str, num_slots: int, config: dict) -> dict:
    batch_size, word_size, heads, k = config["B"], config["W"], config["R"], config["K"]
    buffer_rows = config["buffer_rows"]
    options = {} if name == "exact" else {"buffer_rows": buffer_rows}
    index = make_index(name, batch_size, num_slots, word_size, **options)
    words = words_for(config["memory"], batch_size, num_slots, word_size, seed=num_slots)
    slots = torch.arange(num_slots).expand(batch_size, -1)

    start = time.perf_counter()
    for first in range(0, num_slots, 4096):
        index.update(words[:, first : first + 4096], slots[:, first : first + 4096])
    index.rebuild()
    fill = time.perf_counter() - start
    start = time.perf_counter()
    index.rebuild()
    rebuild = time.perf_counter() - start

    g = torch.Generator().manual_seed(1)
    # One merge: overwrite a full buffer's worth of rows (tombstones for HNSW, removals for IVF).
    merge_rows = min(buffer_rows, num_slots)
    merged_slots = torch.stack([torch.randperm(num_slots, generator=g)[:merge_rows] for _ in range(batch_size)])
    merged_words = words.gather(1, merged_slots.unsqueeze(-1).expand(-1, -1, word_size))
    before = index.stats().merge_seconds
    index.update(merged_words, merged_slots)
    merge_per_row = (index.stats().merge_seconds - before) / (merge_rows * batch_size)

    # Steady state: the buffer half full, then one step's writes of J rows per batch row.
    half = min(buffer_rows // 2, num_slots)
    index.update(words[:, :half], slots[:, :half])
    step_slots = torch.randint(0, num_slots, (batch_size, config["J"]), generator=g)
    step_words = words.gather(1, step_slots.unsqueeze(-1).expand(-1, -1, word_size))
    update = time_cpu(lambda: index.update(step_words, step_slots))

    keys = near_queries(words, heads, seed=2)
    search = time_cpu(lambda: index.search(keys, k))
    stats = index.stats()
    result = {
        "index": name,
        "N": num_slots,
        "fill_seconds": fill,
        "rebuild_seconds": rebuild,
        "merge_ms_per_row": merge_per_row * 1e3,
        "update_ms": update["median"] * 1e3,
        "search_ms": search["median"] * 1e3,
        "search_iqr_ms": search["iqr"] * 1e3,
        "bytes": stats.bytes,
        "tombstones": stats.tombstones,
        "buffered": stats.buffered,
        "load_average": os.getloadavg()[0],  # a busy machine slows every timing above
    }
    if name != "exact":
        exact = ExactIndex(batch_size, num_slots, word_size)
        exact.update(words, slots)
        result["recall"] = recall(index, exact, near_queries(words, 256, seed=3), k)
    return result


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("search_ms", "search ms (B x R keys)", True),
        ("recall", "recall@K vs exact", False),
        ("rebuild_seconds", "build from scratch, s", True),
        ("merge_ms_per_row", "merge ms per row", True),
        ("update_ms", "one step's update, ms", True),
        ("bytes", "index bytes", True),
    ]
    names = list(dict.fromkeys(r["index"] for r in results))
    colours = {name: f"C{i}" for i, name in enumerate(names)}
    figure, axes = plt.subplots(2, 3, figsize=(14, 8))
    for axis, (key, title, log) in zip(axes.flat, panels, strict=True):
        for name in names:
            if name == "exact" and key in ("rebuild_seconds", "merge_ms_per_row"):
                continue  # nothing to build or merge
            rows = [r for r in results if r["index"] == name and r.get(key) is not None]
            if rows:
                axis.plot([r["N"] for r in rows], [r[key] for r in rows], marker="o", label=name, color=colours[name])
        axis.set_xscale("log", base=2)
        if log:
            axis.set_yscale("log")
        axis.set_title(title)
        axis.set_xlabel("N")
        axis.grid(True, which="both", alpha=0.3)
    axes.flat[0].legend()
    figure.tight_layout()
    temporary = path.with_suffix(".tmp.png")
    figure.savefig(temporary, dpi=100)
    temporary.replace(path)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--indexes", default="exact,faiss-hnsw,faiss-ivf")
    parser.add_argument("--min-log2-slots", type=int, default=10)
    parser.add_argument("--max-log2-slots", type=int, default=16)
    parser.add_argument("--full", action="store_true", help="up to N = 2^20")
    parser.add_argument("--batch", type=int, default=1, help="B: one index per batch row, costs add up")
    parser.add_argument("--word", type=int, default=64)
    parser.add_argument("--reads", type=int, default=4, help="R keys per batch row per search")
    parser.add_argument("--writes", type=int, default=33, help="J rows per batch row per step (R*K+1)")
    parser.add_argument("--buffer-rows", type=int, default=4096)
    parser.add_argument("--memory", choices=["clustered", "random"], default="clustered")
    parser.add_argument("--out", default=str(RESULTS / "index.json"))
    parser.add_argument("--plot-only", action="store_true", help="redraw --out's PNG (e.g. of an interrupted run)")
    args = parser.parse_args(argv)
    if args.plot_only:
        results = json.loads(Path(args.out).read_text())["results"]
        plot(results, Path(args.out).with_suffix(".png"))
        return results
    if os.environ.get("SPARSEMEM_THREADS"):
        torch.set_num_threads(int(os.environ["SPARSEMEM_THREADS"]))
    top = 20 if args.full else args.max_log2_slots
    config = {
        "B": args.batch,
        "W": args.word,
        "R": args.reads,
        "K": 8,
        "J": args.writes,
        "buffer_rows": args.buffer_rows,
        "memory": args.memory,
        "dtype": "float32",
        "device": "cpu",
        "faiss_threads": os.environ.get("SPARSEMEM_THREADS", "all cores"),
        "load_average_at_start": os.getloadavg(),
    }
    cases = [(name, 2**e) for e in range(args.min_log2_slots, top + 1) for name in args.indexes.split(",")]
    results = []
    for name, num_slots in tqdm(cases, desc="index", unit="case"):
        results.append(run_case(name, num_slots, config))
        write_json(Path(args.out), {"header": header(config), "results": results})  # keep partial runs
    print(
        f"\n{'index':<12}{'N':>9}{'fill s':>9}{'build s':>9}{'merge ms/row':>13}"
        f"{'update ms':>10}{'search ms':>10}{'recall':>8}{'MiB':>9}"
    )
    for r in results:
        recall_text = f"{r['recall']:.3f}" if "recall" in r else "1"
        print(
            f"{r['index']:<12}{r['N']:>9}{r['fill_seconds']:>9.2f}{r['rebuild_seconds']:>9.2f}"
            f"{r['merge_ms_per_row']:>13.4f}{r['update_ms']:>10.3f}{r['search_ms']:>10.3f}{recall_text:>8}"
            f"{r['bytes'] / 2**20:>9.1f}"
        )
    path = write_json(Path(args.out), {"header": header(config), "results": results})
    plot(results, path.with_suffix(".png"))
    print(f"\nwrote {path} and {path.with_suffix('.png').name}")
    return results


if __name__ == "__main__":
    main()
