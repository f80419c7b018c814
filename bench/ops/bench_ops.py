"""Time each op, each backend that runs here, vs N: forward and forward+backward.

    python -m bench.ops.bench_ops                      # short: N = 2^10..2^14, links 2^10..2^11
    python -m bench.ops.bench_ops --full               # N = 2^10..2^20, links (N x N) 2^10..2^13
    python -m bench.ops.bench_ops --ops allocation_weights,link_update --max-log2-slots 12
    python -m bench.ops.bench_ops --threads 1    # on a shared, loaded machine: no thread waits on a
                                                 # descheduled sibling, so ratios are per core

Config: B = 8, W = 64, R = 4, float32, CPU. For each (op, N) the backends run back to back, so
their ratio is measured under the same machine load. Each timing is torch.utils.benchmark's
blocked_autorange: median and quantiles over its runs. Cases whose tensors would not fit in
--max-memory-gb are skipped and listed. Prints a table with each backend's speed-up over the
torch backend, and writes bench/results/ops.json (with header) and ops.png (log-log time vs N).

On the GPU, `--device cuda` (e.g. with --full): the ops' tensors live on the GPU, timings come
from triton.testing.do_bench (median and 20/80% quantiles), each case also reports the
bandwidth its inputs and outputs imply (forward GB/s), the header carries the measured
device-to-device copy bandwidth, and results go to ops_cuda.json / ops_cuda.png.
"""

import argparse
import os
from pathlib import Path

import torch
from tqdm import tqdm

import sparsemem as sm
from bench.common import RESULTS, copy_bandwidth, header, time_cpu, time_gpu, write_json
from sparsemem._files import atomic_write
from sparsemem.testing import OPS, op_inputs

QUADRATIC = {"link_update", "temporal_reads", "link_update_reads"}  # [B, N, N] inputs: capped lower
# Live tensors of the op's largest size during the torch backend's forward+backward (inputs,
# outputs, gradients and the reference's temporaries): a rough bound for skipping.
LIVE_TENSORS = 10


def estimated_bytes(op: str, num_slots: int, config: dict) -> int:
    largest = num_slots * num_slots if op in QUADRATIC else num_slots * config["W"]
    return LIVE_TENSORS * config["B"] * largest * 4


def run_case(op: str, backend: str, num_slots: int, config: dict) -> dict:
    os.environ["SPARSEMEM_BACKEND"] = backend
    fn = getattr(sm.ops, op)
    args = op_inputs(op, torch.float32, B=config["B"], N=num_slots, W=config["W"], R=config["R"])
    args = tuple(a.to(config["device"]) if isinstance(a, torch.Tensor) else a for a in args)
    leaves = [a.requires_grad_(True) for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]

    def forward():
        with torch.no_grad():
            fn(*args)

    def forward_backward():
        outputs = fn(*args)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        loss = sum(o.float().sum() for o in outputs if o.is_floating_point())
        torch.autograd.grad(loss, leaves)

    if config["device"] == "cuda":
        result = {"op": op, "backend": backend, "N": num_slots, "forward": time_gpu(forward)}
        outputs = fn(*args)
        tensors = (*args, *(outputs if isinstance(outputs, tuple) else (outputs,)))
        moved = sum(t.nbytes for t in tensors if isinstance(t, torch.Tensor))
        result["forward_gbps"] = moved / result["forward"]["median"] / 1e9
        result["forward_backward"] = time_gpu(forward_backward)
        return result
    min_run_time = config["min_run_time"]
    return {
        "op": op,
        "backend": backend,
        "N": num_slots,
        "forward": time_cpu(forward, min_run_time),
        "forward_backward": time_cpu(forward_backward, min_run_time),
    }


def speedups(results: list[dict]) -> list[dict]:
    """Per (op, N, backend): torch backend time / this backend's time, forward and forward+backward."""
    torch_times = {(r["op"], r["N"]): r for r in results if r["backend"] == "torch"}
    rows = []
    for r in results:
        base = torch_times.get((r["op"], r["N"]))
        if base is None or r["backend"] == "torch":
            continue
        rows.append(
            {
                "op": r["op"],
                "N": r["N"],
                "backend": r["backend"],
                "forward": base["forward"]["median"] / r["forward"]["median"],
                "forward_backward": base["forward_backward"]["median"] / r["forward_backward"]["median"],
            }
        )
    return rows


def plot(results: list[dict], path: Path) -> Path:
    """One panel per op: log-log median time vs N, a colour per backend, forward solid, +backward dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = sorted({r["op"] for r in results})
    columns = min(4, len(ops))
    rows = (len(ops) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False)
    backends = sorted({r["backend"] for r in results})
    colours = {backend: f"C{i}" for i, backend in enumerate(backends)}
    for axis, op in zip(axes.flat, ops, strict=False):
        for backend in backends:
            cases = sorted((r for r in results if r["op"] == op and r["backend"] == backend), key=lambda r: r["N"])
            if not cases:
                continue
            sizes = [r["N"] for r in cases]
            for mode, style in (("forward", "-"), ("forward_backward", "--")):
                label = f"{backend} {'fwd' if mode == 'forward' else 'fwd+bwd'}"
                medians = [r[mode]["median"] * 1e3 for r in cases]
                axis.plot(sizes, medians, style, marker="o", markersize=3, color=colours[backend], label=label)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_title(op, fontsize=10)
        axis.set_xlabel("N (slots)")
        axis.set_ylabel("ms (median)")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(ops) :]:
        axis.set_visible(False)
    figure.tight_layout()
    atomic_write(path, lambda temporary: figure.savefig(temporary, dpi=100))
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default=",".join(OPS), help="comma-separated op names")
    parser.add_argument("--full", action="store_true", help="N up to 2^20 (links 2^13)")
    parser.add_argument("--min-log2-slots", type=int, default=10)
    parser.add_argument("--max-log2-slots", type=int, default=None, help="default 14, --full 20")
    parser.add_argument("--max-log2-slots-links", type=int, default=None, help="default 11, --full 13")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--word", type=int, default=64)
    parser.add_argument("--reads", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch and extension threads (default: torch's)")
    parser.add_argument("--min-run-time", type=float, default=0.2, help="seconds per timing (blocked_autorange)")
    parser.add_argument(
        "--max-memory-gb", type=float, default=None, help="skip cases estimated above this (6; cuda: half the GPU)"
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default=None, help="default bench/results/ops.json (ops_cuda.json on the GPU)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():  # as bench.scaling says it
        parser.error("--device cuda: torch here has no CUDA device")
    if args.threads is not None:
        # at::parallel_for in the extension shares torch's thread pool, so this sets both
        torch.set_num_threads(args.threads)
    if args.max_memory_gb is None:
        gpu = args.device == "cuda"
        args.max_memory_gb = torch.cuda.get_device_properties(0).total_memory / 2**31 if gpu else 6.0
    out = Path(args.out or RESULTS / ("ops_cuda.json" if args.device == "cuda" else "ops.json"))
    top = args.max_log2_slots if args.max_log2_slots is not None else (20 if args.full else 14)
    top_links = args.max_log2_slots_links if args.max_log2_slots_links is not None else (13 if args.full else 11)
    config = {
        "B": args.batch,
        "W": args.word,
        "R": args.reads,
        "dtype": "float32",
        "device": args.device,
        "threads": torch.get_num_threads(),
        "min_run_time": args.min_run_time,
        "max_memory_gb": args.max_memory_gb,
    }
    if args.device == "cuda":
        config["copy_bandwidth_gbps"] = copy_bandwidth() / 1e9
    forced = os.environ.get("SPARSEMEM_BACKEND")
    cases, skipped = [], []
    for op in args.ops.split(","):
        backends = sm.backends_for(op, args.device).runnable
        for exponent in range(args.min_log2_slots, (top_links if op in QUADRATIC else top) + 1):
            if estimated_bytes(op, 2**exponent, config) > args.max_memory_gb * 2**30:
                skipped.append({"op": op, "N": 2**exponent, "reason": f"estimated above {args.max_memory_gb} GB"})
                continue
            # backends of one (op, N) back to back: their ratio sees the same machine load
            cases += [(op, backend, 2**exponent) for backend in backends]
    results = [run_case(op, b, n, config) for op, b, n in tqdm(cases, desc="ops", unit="case")]
    if forced is None:
        os.environ.pop("SPARSEMEM_BACKEND", None)
    else:
        os.environ["SPARSEMEM_BACKEND"] = forced
    print(f"\n{'op':<20}{'backend':<9}{'N':>9}{'fwd ms':>10}{'fwd+bwd ms':>12}{'fwd GB/s':>10}")
    for r in results:
        fwd, fwd_bwd = r["forward"]["median"] * 1e3, r["forward_backward"]["median"] * 1e3
        gbps = f"{r['forward_gbps']:>10.1f}" if "forward_gbps" in r else ""
        print(f"{r['op']:<20}{r['backend']:<9}{r['N']:>9}{fwd:>10.3f}{fwd_bwd:>12.3f}{gbps}")
    if "copy_bandwidth_gbps" in config:
        print(f"device-to-device copy: {config['copy_bandwidth_gbps']:.1f} GB/s")
    ratios = speedups(results)
    if ratios:
        print("\nspeed-up over the torch backend (torch time / backend time)")
        print(f"{'op':<20}{'backend':<9}{'N':>9}{'fwd':>8}{'fwd+bwd':>9}")
        for r in ratios:
            print(f"{r['op']:<20}{r['backend']:<9}{r['N']:>9}{r['forward']:>7.2f}x{r['forward_backward']:>8.2f}x")
    for s in skipped:
        print(f"skipped {s['op']} N={s['N']}: {s['reason']}")
    path = write_json(out, {"header": header(config), "results": results, "speedups": ratios, "skipped": skipped})
    print(f"\nwrote {path}")
    if results:
        print(f"wrote {plot(results, path.with_suffix('.png'))}")
    return results


if __name__ == "__main__":
    main()
