"""Index build, merge, update and search times, recall@K and memory vs N, in the full regime.

    python -m bench.bench_index [--full] [--indexes exact,ivf,faiss-hnsw,faiss-ivf] [--memory clustered]
    python -m bench.bench_index --device cuda --indexes exact,ivf      # the torch indexes on a GPU
    python -m bench.bench_index --sweep [--device cuda]                # ivf: recall and time vs nlist, nprobe

Full regime: every one of the N slots of each batch row written. Per index and N:
- fill: wall time to write all N rows through update() (buffer + merges for faiss), then
  rebuild: time of one rebuild() from scratch of the filled index; with --fill load, fill is
  one Index.load of all N rows (the preload path) and no rebuild is timed;
- merge: time per row of one merge of the exact buffer (buffer_rows overwritten rows) into
  the full index; update: time of one step's writes (J rows per batch row) into the buffer;
- search: K = 8 for R keys per batch row, with the buffer half full (the steady state);
- recall@K against ExactIndex on the same rows, over 256 keys per batch row near stored words;
- bytes: IndexStats.bytes.
The default goes to N = 2^16; --full to 2^20 (HNSW builds ~1 min per batch row there).
Writes bench/results/index.json (with header) and index.png, the JSON after every case,
so an interrupted run keeps what it measured (--plot-only redraws its PNG).
--device cuda puts the torch indexes (exact, ivf) and their inputs on the GPU and times
with CUDA events (faiss stays on the CPU). --sweep measures TorchIVFIndex alone: per N and
nlist (a multiple of sqrt(N)), build time, then recall@K and search time for each nprobe;
it chose ivf.default_nlist and default_nprobe (bench/results/index_ivf_sweep*.json).
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from bench.common import RESULTS, header, log_axes, pyplot, save_figure, time_cpu, time_gpu, write_json
from sparsemem.index import ExactIndex, make_index
from sparsemem.index.ivf import TorchIVFIndex
from sparsemem.index.memories import clustered_words, near_queries, recall


def words_for(memory: str, batch_size: int, num_slots: int, word_size: int, seed: int) -> torch.Tensor:
    if memory == "clustered":
        # ~64 words per cluster at every N: neighbours as crowded at 2^20 as at 2^10
        return clustered_words(batch_size, num_slots, word_size, clusters=max(16, num_slots // 64), seed=seed)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, num_slots, word_size, generator=g)


def on_torch_device(name: str) -> bool:
    """The torch indexes run on --device; faiss runs on the CPU."""
    return name in ("exact", "ivf")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timer(device: str):
    return time_gpu if device == "cuda" else time_cpu


def run_case(name: str, num_slots: int, config: dict) -> dict:
    batch_size, word_size, heads, k = config["B"], config["W"], config["R"], config["K"]
    buffer_rows = config["buffer_rows"]
    device = config["device"] if on_torch_device(name) else "cpu"
    options = {} if name == "exact" else {"buffer_rows": buffer_rows}
    if on_torch_device(name):
        options["device"] = device
    index = make_index(name, batch_size, num_slots, word_size, **options)
    words = words_for(config["memory"], batch_size, num_slots, word_size, seed=num_slots).to(device)
    slots = torch.arange(num_slots, device=device).expand(batch_size, -1)

    start = time.perf_counter()
    rebuild = None
    if config["fill"] == "load":
        index.load(words)  # the preload path: one build from all N rows
        sync(device)
        fill = time.perf_counter() - start
    else:
        for first in range(0, num_slots, 4096):
            index.update(words[:, first : first + 4096], slots[:, first : first + 4096])
        index.rebuild()
        sync(device)
        fill = time.perf_counter() - start
        start = time.perf_counter()
        index.rebuild()
        sync(device)
        rebuild = time.perf_counter() - start

    g = torch.Generator().manual_seed(1)
    # One merge: overwrite a full buffer's worth of rows (tombstones for HNSW, removals for IVF).
    merge_rows = min(buffer_rows, num_slots)
    merged_slots = torch.stack([torch.randperm(num_slots, generator=g)[:merge_rows] for _ in range(batch_size)])
    merged_slots = merged_slots.to(device)
    merged_words = words.gather(1, merged_slots.unsqueeze(-1).expand(-1, -1, word_size))
    before = index.stats().merge_seconds
    index.update(merged_words, merged_slots)
    merge_per_row = (index.stats().merge_seconds - before) / (merge_rows * batch_size)

    # Steady state: the buffer half full, then one step's writes of J rows per batch row.
    half = min(buffer_rows // 2, num_slots)
    index.update(words[:, :half], slots[:, :half])
    step_slots = torch.randint(0, num_slots, (batch_size, config["J"]), generator=g).to(device)
    step_words = words.gather(1, step_slots.unsqueeze(-1).expand(-1, -1, word_size))
    update = timer(device)(lambda: index.update(step_words, step_slots))

    keys = near_queries(words.cpu(), heads, seed=2).to(device)
    search = timer(device)(lambda: index.search(keys, k))
    stats = index.stats()
    result = {
        "index": name,
        "N": num_slots,
        "fill_seconds": fill,
        "rebuild_seconds": rebuild,
        "merge_ms_per_row": merge_per_row * 1e3,
        "update_ms": update["median"] * 1e3,
        "search_ms": search["median"] * 1e3,
        "search_iqr_ms": (search["q75"] - search["q25"] if "q75" in search else search["q80"] - search["q20"]) * 1e3,
        "device": device,
        "bytes": stats.bytes,
        "tombstones": stats.tombstones,
        "buffered": stats.buffered,
        "load_average": os.getloadavg()[0],  # a busy machine slows every timing above
    }
    if name != "exact":
        exact = ExactIndex(batch_size, num_slots, word_size, device=device)
        exact.update(words, slots)
        result["recall"] = recall(index, exact, near_queries(words.cpu(), 256, seed=3).to(device), k)
    return result


def run_sweep(num_slots: int, config: dict, lists_per_sqrt: list[float], probes: list[int]) -> list[dict]:
    """TorchIVFIndex over a full memory: per nlist, build time; per nprobe, recall@K and search time."""
    batch_size, word_size, heads, k, device = config["B"], config["W"], config["R"], config["K"], config["device"]
    words = words_for(config["memory"], batch_size, num_slots, word_size, seed=num_slots).to(device)
    slots = torch.arange(num_slots, device=device).expand(batch_size, -1)
    exact = ExactIndex(batch_size, num_slots, word_size, device=device)
    exact.update(words, slots)
    keys = near_queries(words.cpu(), heads, seed=2).to(device)
    recall_keys = near_queries(words.cpu(), 256, seed=3).to(device)
    results = []
    for factor in lists_per_sqrt:
        nlist = max(1, round(factor * num_slots**0.5))
        index = TorchIVFIndex(batch_size, num_slots, word_size, device=device, nlist=nlist, buffer_rows=4096)
        index.update(words, slots)  # one bulk write: one build
        sync(device)
        build = index.stats().build_seconds
        for nprobe in probes:
            if nprobe > nlist:
                continue
            index.nprobe = nprobe
            search = timer(device)(lambda index=index: index.search(keys, k))
            results.append(
                {
                    "N": num_slots,
                    "nlist": nlist,
                    "lists_per_sqrt_n": factor,
                    "nprobe": nprobe,
                    "build_seconds": build,
                    "search_ms": search["median"] * 1e3,
                    "recall": recall(index, exact, recall_keys, k),
                    "probes_used": index.probe_plan(k)[0],
                    "candidates_bound": index.probe_plan(k)[1],
                    "load_average": os.getloadavg()[0],
                }
            )
    exact_search = timer(device)(lambda: exact.search(keys, k))
    results.append({"N": num_slots, "index": "exact", "search_ms": exact_search["median"] * 1e3})
    return results


def plot(results: list[dict], path: Path) -> None:
    plt = pyplot()
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
        log_axes(axis, title, log_y=log)
    axes.flat[0].legend()
    figure.tight_layout()
    save_figure(figure, path, dpi=100)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--indexes", default="exact,ivf,faiss-hnsw,faiss-ivf")
    parser.add_argument("--min-log2-slots", type=int, default=10)
    parser.add_argument("--max-log2-slots", type=int, default=16)
    parser.add_argument("--full", action="store_true", help="up to N = 2^20")
    parser.add_argument("--batch", type=int, default=1, help="B: one index per batch row, costs add up")
    parser.add_argument("--word", type=int, default=64)
    parser.add_argument("--reads", type=int, default=4, help="R keys per batch row per search")
    parser.add_argument("--writes", type=int, default=33, help="J rows per batch row per step (R*K+1)")
    parser.add_argument("--buffer-rows", type=int, default=4096)
    parser.add_argument("--memory", choices=["clustered", "random"], default="clustered")
    parser.add_argument(
        "--fill",
        choices=["update", "load"],
        default="update",
        help="update: 4096 slots per update(), then rebuild() (timed twice); load: one Index.load (no rebuild timed)",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="for the torch indexes")
    parser.add_argument("--sweep", action="store_true", help="ivf alone: recall and search time vs nlist, nprobe")
    parser.add_argument("--lists-per-sqrt-n", default="0.5,1,2,4", help="--sweep: nlist = this * sqrt(N)")
    parser.add_argument("--nprobes", default="1,2,4,8,16,32,64,128", help="--sweep: nprobe values")
    parser.add_argument("--out", default=None, help="default bench/results/index.json (index_ivf_sweep.json)")
    parser.add_argument("--plot-only", action="store_true", help="redraw --out's PNG (e.g. of an interrupted run)")
    args = parser.parse_args(argv)
    args.out = args.out or str(RESULTS / ("index_ivf_sweep.json" if args.sweep else "index.json"))
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
        "fill": args.fill,
        "dtype": "float32",
        "device": args.device,
        "faiss_threads": os.environ.get("SPARSEMEM_THREADS", "all cores"),
        "load_average_at_start": os.getloadavg(),
    }
    if args.sweep:
        return sweep(args, config, top)
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
        rebuild_text = "-" if r["rebuild_seconds"] is None else f"{r['rebuild_seconds']:.2f}"
        print(
            f"{r['index']:<12}{r['N']:>9}{r['fill_seconds']:>9.2f}{rebuild_text:>9}"
            f"{r['merge_ms_per_row']:>13.4f}{r['update_ms']:>10.3f}{r['search_ms']:>10.3f}{recall_text:>8}"
            f"{r['bytes'] / 2**20:>9.1f}"
        )
    path = write_json(Path(args.out), {"header": header(config), "results": results})
    plot(results, path.with_suffix(".png"))
    print(f"\nwrote {path} and {path.with_suffix('.png').name}")
    return results


def sweep(args: argparse.Namespace, config: dict, top: int) -> list[dict]:
    factors = [float(f) for f in args.lists_per_sqrt_n.split(",")]
    probes = [int(p) for p in args.nprobes.split(",")]
    results = []
    for exponent in tqdm(range(args.min_log2_slots, top + 1), desc="sweep", unit="N"):
        results += run_sweep(2**exponent, config, factors, probes)
        write_json(Path(args.out), {"header": header(config), "results": results})
    print(f"\n{'N':>9}{'nlist':>7}{'nprobe':>7}{'probed':>7}{'build s':>9}{'search ms':>10}{'recall':>8}")
    for r in results:
        if r.get("index") == "exact":
            print(f"{r['N']:>9}{'exact':>21}{'':>9}{r['search_ms']:>10.3f}{1:>8}")
            continue
        print(
            f"{r['N']:>9}{r['nlist']:>7}{r['nprobe']:>7}{r['probes_used']:>7}{r['build_seconds']:>9.2f}"
            f"{r['search_ms']:>10.3f}{r['recall']:>8.3f}"
        )
    print(f"\nwrote {args.out}")
    return results


if __name__ == "__main__":
    main()
