"""The sparse ops' fast kernels against the torch backend, on the CPU or the GPU.

    python -m bench.ops.bench_sparse [--slots 4096] [--topk-log2-slots 20] [--threads 2]
    python -m bench.ops.bench_sparse --device cuda      # triton, cuda and torch backends on the GPU

1. sparse_read, sparse_write, topk_content, sparse_link_update and sparse_temporal_reads, forward
   and forward+backward, every backend that runs here, at B=8, W=64, R=4, K=8, K_L=8 (sparse_write
   on J = R*K + 1 rows, SAM's write set; sparse_read over a memory of --slots rows, whose memory
   gradient is a dense [B, N, W], and over the R*K rows SAM gathers per step, as SAM calls it; the
   link ops on the arguments an SDNC step passes them, captured from a model after a few steps).
   Also SAM's whole write on a memory of --slots rows as JournaledMemory does it, one node and one
   in-place kernel (journaled_write), and as it did before, gather + sparse_write + scatter
   (write_3_nodes); both with the exact index's update excluded (it is the same in both, ~0.5 ms),
   their backward through the journal's row-keyed gradient buffer included.
2. topk_content forward at N = 2^20 against the torch backend (cosine by matmul, then torch.topk):
   each case in its own process, reporting time and peak RSS above the inputs, since the torch
   path allocates [B, R, N] scores (and a [B, N, W] square for the norms) and the fused kernel
   does not.

Prints tables and writes bench/results/sparse_ops.json (with header) and sparse_ops.png.

With --device cuda the inputs live on the GPU, every backend that runs there is timed (triton
included: on the CPU it only runs interpreted, a correctness check, not a timing) with
triton.testing.do_bench, the topk comparison runs in-process and reports the peak CUDA memory
above the inputs, and the results go to sparse_ops_cuda.json / .png.
"""

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from unittest import mock

import torch

import sparsemem as sm
from bench.common import RESULTS, header, time_cpu, time_gpu, write_json

B, W, R, K, K_L = 8, 64, 4, 8, 8
LINK_OPS = ("sparse_link_update", "sparse_temporal_reads")
JOURNAL_OPS = ("journaled_write", "write_3_nodes")


def timed_backends(op: str, device: str) -> list[str]:
    """The backends of `op` that run on `device`, torch first; interpreted triton on the CPU is
    a correctness check, not a timing."""
    found = sm.backends_for("sparse_write" if op == "write_3_nodes" else op, device).runnable
    return [b for b in found if device == "cuda" or b != "triton"]


@functools.cache
def link_inputs(num_slots: int, steps: int = 8) -> dict[str, tuple]:
    """The arguments of the link ops in the last of `steps` SDNC steps (the links fill as they go)."""
    torch.manual_seed(0)
    model = sm.SDNC(8, 64, num_slots=num_slots, word_size=W, num_reads=R, k=K, link_k=K_L)
    captured = {}

    def capture(op):
        def run(*args):
            captured[op] = tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args)
            return op_functions[op](*args)

        return run

    op_functions = {op: getattr(sm.ops, op) for op in LINK_OPS}
    with torch.no_grad(), mock.patch.multiple(sm.ops, **{op: capture(op) for op in LINK_OPS}):
        model(torch.randn(B, steps, 8))
    return captured


def inputs(op: str, num_slots: int, seed: int = 0) -> tuple:
    if op in LINK_OPS:
        return link_inputs(num_slots)[op]
    g = torch.Generator().manual_seed(seed)
    if op == "sparse_write":
        J = R * K + 1
        erase = torch.zeros(B, J, dtype=torch.bool)
        erase[:, -1] = True  # the least recently used row
        weights = torch.softmax(torch.randn(B, J, generator=g), -1)
        return torch.randn(B, J, W, generator=g), weights, torch.randn(B, W, generator=g), erase
    memory = torch.randn(B, num_slots, W, generator=g)
    keys = torch.randn(B, R, W, generator=g)
    if op == "topk_content":
        return memory, keys, K
    indices = torch.stack([torch.randperm(num_slots, generator=g)[:K] for _ in range(B * R)]).reshape(B, R, K)
    return memory, indices, keys, torch.rand(B, R, generator=g) * 5


def time_journaled_write(op: str, backend: str, num_slots: int, device: str = "cpu") -> dict:
    """SAM's write of one step on a memory whose N rows are all written: J = R*K + 1 slots (heads
    0 and 1 share half their K, the LRU row erased), group-summed weights. Forward: the write under
    no_grad; forward+backward: a one-write segment and its backward (the write node, the gradient
    buffer's set-up, the segment's source), from the write's version token."""
    from sparsemem.memory.journal import JournaledMemory
    from sparsemem.memory.row_store import RowStore
    from sparsemem.memory.sam import group_sum

    os.environ["SPARSEMEM_BACKEND"] = backend
    g = torch.Generator().manual_seed(0)
    store = RowStore(B, num_slots, torch.zeros(W, device=device), index="exact")
    store.preload(lambda b, start, end: torch.randn(end - start, W, generator=g).to(device))
    store.index.update = lambda rows, slots: None  # excluded: the same exact-index update in both paths
    order = torch.stack([torch.randperm(num_slots, generator=g)[: R * K + 1] for _ in range(B)])
    reads, lru = order[:, : R * K].view(B, R, K), order[:, R * K :]
    reads[:, 1, : K // 2] = reads[:, 0, : K // 2]
    slots = torch.cat([reads.reshape(B, -1), lru], 1).to(device)
    erase_rows = slots == lru.to(device)
    raw = torch.softmax(torch.randn(B, R * K + 1, generator=g), -1).to(device)
    weights, first = group_sum(slots, raw)
    weights.requires_grad_(True)
    add = torch.randn(B, W, generator=g).to(device).requires_grad_(True)
    no_grad_token = torch.empty(0, device=device)

    def write(memory: JournaledMemory) -> None:
        if op == "journaled_write":
            memory.write(slots, weights, add, erase_rows, first)
        else:
            rows = memory.gather(slots)
            memory.scatter(slots, sm.ops.sparse_write(rows, weights, add, erase_rows), first)

    def forward():
        with torch.no_grad():
            write(JournaledMemory(store))

    def forward_backward():
        memory = JournaledMemory(store)
        write(memory)
        torch.autograd.grad(memory.token(), (weights, add), no_grad_token)

    timer = time_gpu if device == "cuda" else functools.partial(time_cpu, min_run_time=0.5)
    timings = {"forward": timer(forward), "forward_backward": timer(forward_backward)}
    return {"op": op, "backend": backend, "N": num_slots, **timings}


def time_op(op: str, backend: str, num_slots: int, device: str = "cpu") -> dict:
    if op in JOURNAL_OPS:
        return time_journaled_write(op, backend, num_slots, device)
    os.environ["SPARSEMEM_BACKEND"] = backend
    fn = getattr(sm.ops, op)
    args = inputs(op, num_slots)
    args = tuple(
        a.detach().to(device).requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor) else a for a in args
    )
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    outputs = [o for o in fn(*args) if o.is_floating_point()] if op != "sparse_write" else [fn(*args)]
    seeds = [torch.randn_like(o) for o in outputs]

    def forward():
        with torch.no_grad():
            fn(*args)

    def forward_backward():
        result = fn(*args)
        result = result if isinstance(result, tuple) else (result,)
        torch.autograd.grad([o for o in result if o.is_floating_point()], leaves, seeds)

    timer = time_gpu if device == "cuda" else functools.partial(time_cpu, min_run_time=0.5)
    timings = {"forward": timer(forward), "forward_backward": timer(forward_backward)}
    return {"op": op, "backend": backend, "N": num_slots, **timings}


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def topk_child(backend: str, num_slots: int) -> dict:
    """Runs in its own process: topk_content forward time and peak RSS beyond the inputs."""
    os.environ["SPARSEMEM_BACKEND"] = backend
    with torch.no_grad():  # the first call of an op imports and caches code: not the op's memory
        sm.ops.topk_content(*inputs("topk_content", 64))
    memory, keys, k = inputs("topk_content", num_slots)
    before = peak_rss_bytes()
    with torch.no_grad():
        sm.ops.topk_content(memory, keys, k)  # the first call sets the peak
        extra = peak_rss_bytes() - before
        timing = time_cpu(lambda: sm.ops.topk_content(memory, keys, k), min_run_time=2.0)
    return {
        "op": "topk_content",
        "backend": backend,
        "N": num_slots,
        "forward": timing,
        "inputs_bytes": memory.nbytes + keys.nbytes,
        "peak_rss_above_inputs_bytes": extra,
        "peak_rss_bytes": peak_rss_bytes(),
        "scores_BRN_bytes": B * R * num_slots * memory.element_size(),
    }


def topk_cuda(backend: str, num_slots: int) -> dict:
    """topk_content forward on the GPU: time and peak CUDA memory above the inputs."""
    os.environ["SPARSEMEM_BACKEND"] = backend
    memory, keys, k = inputs("topk_content", num_slots)
    memory, keys = memory.cuda(), keys.cuda()
    with torch.no_grad():
        sm.ops.topk_content(memory, keys, k)  # compiles the kernels
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        sm.ops.topk_content(memory, keys, k)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before
        timing = time_gpu(lambda: sm.ops.topk_content(memory, keys, k))
    return {
        "op": "topk_content",
        "backend": backend,
        "N": num_slots,
        "forward": timing,
        "inputs_bytes": memory.nbytes + keys.nbytes,
        "peak_rss_above_inputs_bytes": extra,  # CUDA memory here
        "scores_BRN_bytes": B * R * num_slots * memory.element_size(),
    }


def run_child(backend: str, num_slots: int, threads: int) -> dict:
    command = [sys.executable, "-m", "bench.ops.bench_sparse", "--child", backend, "--slots", str(num_slots)]
    command += ["--threads", str(threads)]
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=root)
    return json.loads(done.stdout.strip().splitlines()[-1])


def plot(results: list[dict], topk: list[dict], path: Path, device: str = "cpu") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    labels, speedups = [], []
    for r in results:
        if r["backend"] == "torch":
            continue
        base = next(t for t in results if t["op"] == r["op"] and t["N"] == r["N"] and t["backend"] == "torch")
        for phase in ("forward", "forward_backward"):
            labels.append(f"{r['op']} N={r['N']}\n{r['backend']} {phase.replace('forward_backward', 'fwd+bwd')[:7]}")
            speedups.append(base[phase]["median"] / r[phase]["median"])
    left.bar(range(len(speedups)), speedups)
    left.axhline(3, color="red", linestyle="--", label="target 3x")
    left.set_xticks(range(len(labels)), labels, fontsize=7, rotation=90)
    left.set_yscale("log")  # the link ops' speed-ups are 100x the others'
    left.set_ylabel("speed-up over the torch backend (median)")
    left.set_title(f"B={B} W={W} R={R} K={K}, {device.upper()}")
    left.legend()
    names = [f"{t['backend']}\nN=2^{t['N'].bit_length() - 1}" for t in topk]
    right.bar(names, [t["forward"]["median"] * 1e3 for t in topk], color="tab:blue")
    right.set_ylabel("topk_content forward, ms", color="tab:blue")
    twin = right.twinx()
    twin.plot(names, [t["peak_rss_above_inputs_bytes"] / 2**20 for t in topk], "o", color="tab:orange")
    memory = "peak CUDA memory" if device == "cuda" else "peak RSS"
    twin.set_ylabel(f"{memory} above inputs, MiB", color="tab:orange")
    right.set_title("topk_content vs matmul + torch.topk")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slots", type=int, default=4096, help="N for the per-op timings")
    parser.add_argument("--topk-log2-slots", type=int, default=20, help="N = 2^this for the topk comparison")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one topk case, JSON on stdout
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default=None, help="default bench/results/sparse_ops.json (_cuda.json on the GPU)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():  # as bench.scaling says it
        parser.error("--device cuda: torch here has no CUDA device")
    device = args.device
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(topk_child(args.child, args.slots)))
        return {}
    config = {"B": B, "W": W, "R": R, "K": K, "K_L": K_L, "J": R * K + 1, "dtype": "float32", "device": device}
    config |= {"N": args.slots, "topk_N": 2**args.topk_log2_slots, "threads": args.threads}
    # sparse_read twice: over a memory of N slots (its memory gradient is a dense [B, N, W]) and
    # as SAM calls it, over the R*K rows gathered for the step (memory [B, R*K, W]).
    cases = [("sparse_read", args.slots), ("sparse_read", R * K)]
    cases += [(op, args.slots) for op in ("sparse_write", *JOURNAL_OPS, "topk_content", *LINK_OPS)]
    results = [
        time_op(op, backend, num_slots, device) for op, num_slots in cases for backend in timed_backends(op, device)
    ]
    os.environ.pop("SPARSEMEM_BACKEND", None)
    # On a shared machine the median moves with the load; the 10% quantile is the run's quiet end.
    print(f"\n{'op':<22}{'backend':<9}{'N':>8}{'fwd us':>10}{'fwd+bwd us':>12}", end="")
    quantile = "q20" if device == "cuda" else "q10"  # do_bench gives 20/80%, torch.utils.benchmark more
    print(f"{'fwd x':>7}{'f+b x':>7}{'f+b x ' + quantile:>11}")
    for r in results:
        base = next(t for t in results if t["op"] == r["op"] and t["N"] == r["N"] and t["backend"] == "torch")
        fwd, fwd_bwd = r["forward"]["median"], r["forward_backward"]["median"]
        ratios = base["forward"]["median"] / fwd, base["forward_backward"]["median"] / fwd_bwd
        quiet = base["forward_backward"][quantile] / r["forward_backward"][quantile]
        r["speedup"] = {"forward": ratios[0], "forward_backward": ratios[1], f"forward_backward_{quantile}": quiet}
        print(f"{r['op']:<22}{r['backend']:<9}{r['N']:>8}{fwd * 1e6:>10.1f}{fwd_bwd * 1e6:>12.1f}", end="")
        print(f"{ratios[0]:>7.2f}{ratios[1]:>7.2f}{quiet:>11.2f}")
    topk_slots = 2**args.topk_log2_slots
    if device == "cuda":
        topk = [topk_cuda(backend, topk_slots) for backend in timed_backends("topk_content", device)]
    else:
        topk = [run_child(backend, topk_slots, args.threads) for backend in timed_backends("topk_content", device)]
    os.environ.pop("SPARSEMEM_BACKEND", None)
    memory = "peak CUDA mem above inputs MiB" if device == "cuda" else "peak RSS above inputs MiB"
    print(f"\ntopk_content forward at B={B} N={topk_slots} W={W} R={R} K={K}")
    print(f"{'backend':<9}{'ms':>10}{memory:>32}{'[B,R,N] scores MiB':>20}")
    for t in topk:
        print(f"{t['backend']:<9}{t['forward']['median'] * 1e3:>10.1f}", end="")
        print(f"{t['peak_rss_above_inputs_bytes'] / 2**20:>32.1f}{t['scores_BRN_bytes'] / 2**20:>20.1f}")
    payload = {"header": header(config), "results": results, "topk_large": topk}
    out = args.out or RESULTS / ("sparse_ops_cuda.json" if device == "cuda" else "sparse_ops.json")
    path = write_json(Path(out), payload)
    plot(results, topk, path.with_suffix(".png"), device)
    print(f"\nwrote {path} and {path.with_suffix('.png')}")
    return payload


if __name__ == "__main__":
    main()
