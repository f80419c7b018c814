"""A memory sharded across ranks (issue 20 item 4): step time, per-rank memory and the bytes each
rank sends per step, against the world size P, for SAM / SDNC with shard_group=WORLD at N = 2^20
in the full regime (every slot written and indexed: init_state(B, memory=[N, W])).

    python -m bench.bench_sharded                          # P = 1, 2: SAM, exact index, N = 2^20
    python -m bench.bench_sharded --world-sizes 1 2 4 --model sdnc --index faiss-ivf

Each P starts P processes (gloo on 127.0.0.1, one thread each: P cores), every rank builds the same
model from one seed and the same [N, W] memory, keeps its N/P slots and steps the same inputs;
P = 1 also runs the unsharded model (no shard_group) beside the sharded one of one rank. Per rank:
resident memory after the imports, what the sharded state holds (RSS after init_state, the initial
memory freed), the peak while building it and while stepping; forward and backward ms per step
(one step = one time step: a T-step forward(+backward) / T; a warm-up, then --repeats, median)
and the forward's process (CPU) time per step,
each rank starting every repeat at a barrier and the slowest rank counting; and the bytes the
rank puts into the collectives per step (ShardGroup.traffic: its contributions; a ring all_reduce
moves 2 (P-1)/P of that per rank, an all_gather (P-1) times it in). Results:
bench/results/sharded/sharded.json and sharded.md, with the load average before and after.
"""

import argparse
import datetime
import gc
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.common import RESULTS, PeakMemory, header, measured_median, rss_bytes, write_json, write_text

OUT = RESULTS / "sharded"
MIB = 2**20


def _rank(args: argparse.Namespace) -> dict:
    """One rank's measurements (runs in its own process)."""
    import torch.distributed as dist

    import sparsemem as sm

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{args.port}",
        rank=args.rank,
        world_size=args.world,
        timeout=datetime.timedelta(seconds=args.timeout),
    )
    memory_meter = PeakMemory(torch.device("cpu"))
    base = rss_bytes()
    cls = sm.SAM if args.model == "sam" else sm.SDNC
    group = None if args.plain else dist.group.WORLD
    torch.manual_seed(0)
    model = cls(
        args.input_size, args.hidden, num_slots=args.slots, word_size=args.word_size, num_reads=args.reads,
        k=args.k, index=args.index, shard_group=group,
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    memory = torch.randn(args.slots, args.word_size, generator=g)
    x = torch.randn(args.batch, args.steps, args.input_size, generator=g)
    dist.barrier()
    memory_meter.reset_peak()
    start = time.perf_counter()
    state = model.init_state(args.batch, memory)
    build = time.perf_counter() - start
    del memory
    gc.collect()
    held = rss_bytes() - base
    peak_build = memory_meter.peak() - base
    shard = getattr(model.memory, "shard", None)

    def run(state, backward: bool):
        dist.barrier()
        start, cpu = time.perf_counter(), time.process_time()
        y, new = model(x, state)
        forward, forward_cpu = time.perf_counter() - start, time.process_time() - cpu
        if backward:
            y.square().mean().backward()
        total = time.perf_counter() - start
        # the slowest rank's time counts: every rank waits for it at the next collective anyway
        times = torch.tensor([forward, total - forward, forward_cpu], dtype=torch.float64)
        dist.all_reduce(times, dist.ReduceOp.MAX)
        return new.detach(), times.tolist()

    state, _ = run(state, True)  # warm-up
    memory_meter.reset_peak()
    forward, backward, forward_cpu, traffic = [], [], [], {"forward": {}, "backward": {}}
    for _ in range(args.repeats):
        if shard is not None:
            shard.reset_traffic()
        with torch.no_grad():
            state, (seconds, _, cpu_seconds) = run(state, False)
        sent = dict(shard.traffic) if shard is not None else {}
        state, (_, seconds_back, _) = run(state, True)
        if shard is not None:  # the forward with grad sent what the one without did: the rest is backward's
            traffic = {"forward": sent, "backward": {key: n - 2 * sent.get(key, 0) for key, n in shard.traffic.items()}}
        forward.append(seconds)
        forward_cpu.append(cpu_seconds)
        backward.append(seconds_back)
    steps = args.steps
    per_step = {
        phase: {key: value / steps for key, value in counts.items() if value} for phase, counts in traffic.items()
    }
    result = {
        "rank": args.rank,
        "P": args.world,
        "sharded": not args.plain,
        "local_slots": shard.local_slots if shard is not None else args.slots,
        "forward_ms_per_step": 1e3 * measured_median(forward) / steps,
        "backward_ms_per_step": 1e3 * measured_median(backward) / steps,
        "forward_cpu_ms_per_step": 1e3 * measured_median(forward_cpu) / steps,
        "forward_ms_runs": [1e3 * t / steps for t in forward],
        "build_seconds": build,
        "rss_base_mib": base / MIB,
        "held_mib": held / MIB,
        "peak_build_mib": peak_build / MIB,
        "peak_steps_mib": (memory_meter.peak() - base) / MIB,
        "traffic_per_step": per_step,
    }
    dist.destroy_process_group()
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: argparse.Namespace, world: int, plain: bool) -> list[dict]:
    """P processes of this module in --rank mode -> each rank's result."""
    args.out.mkdir(parents=True, exist_ok=True)
    port, out = _free_port(), args.out / f".ranks-{os.getpid()}"
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(RESULTS.parents[1])}
    processes = []
    for rank in range(world):
        command = [sys.executable, "-m", "bench.bench_sharded", "--rank", str(rank), "--world", str(world)]
        command += ["--port", str(port), "--rank-out", f"{out}.{rank}", *(["--plain"] if plain else [])]
        processes.append(subprocess.Popen(command + _config_args(args), env=env, cwd=RESULTS.parents[1]))
    deadline = time.monotonic() + args.run_timeout
    try:
        for process in processes:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    results = []
    for rank, process in enumerate(processes):
        path = Path(f"{out}.{rank}")
        if process.returncode != 0 or not path.exists():
            raise RuntimeError(f"P={world} rank {rank} failed (exit status {process.returncode})")
        results.append(json.loads(path.read_text()))
        path.unlink()
    return results


CONFIG = ("model", "index", "slots", "batch", "word_size", "reads", "k", "steps", "repeats", "hidden", "input_size")


def _config_args(args: argparse.Namespace) -> list[str]:
    out = ["--timeout", str(args.timeout)]
    for name in CONFIG:
        out += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return out


def _load() -> list[float]:
    return list(os.getloadavg())


def _markdown(payload: dict) -> str:
    config = payload["config"]
    lines = [
        f"# Sharded memory: {config['model'].upper()} at N = 2^{config['slots'].bit_length() - 1}, "
        f"{config['index']} index, full regime",
        "",
        f"B={config['batch']}, W={config['word_size']}, R={config['reads']}, K={config['k']}, "
        f"T={config['steps']}, float32, gloo on one machine, one thread per rank; commit {payload['commit']}; "
        f"load average {payload['load_before'][0]:.2f} before, {payload['load_after'][0]:.2f} after "
        f"({payload['cores']} cores).",
        "",
        "| run | P | slots per rank | forward ms/step | forward CPU ms/step per rank | backward ms/step "
        "| held MiB per rank | peak MiB per rank (build / steps) | bytes sent per step per rank (fwd / bwd) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in payload["rows"]:
        ranks = row["ranks"]
        sent = [sum(v for k, v in r["traffic_per_step"].get(phase, {}).items() if k.endswith("_bytes"))
                for r in ranks[:1] for phase in ("forward", "backward")]  # fmt: skip
        lines.append(
            f"| {'sharded' if row['sharded'] else 'unsharded'} | {row['P']} | {ranks[0]['local_slots']:,} | "
            f"{ranks[0]['forward_ms_per_step']:.1f} | {ranks[0]['forward_cpu_ms_per_step']:.1f} | "
            f"{ranks[0]['backward_ms_per_step']:.1f} | "
            f"{max(r['held_mib'] for r in ranks):.0f} | "
            f"{max(r['peak_build_mib'] for r in ranks):.0f} / {max(r['peak_steps_mib'] for r in ranks):.0f} | "
            f"{sent[0]:,.0f} / {sent[1]:,.0f} |"
        )
    lines += [
        "",
        "Times are the slowest rank's, medians of the repeats; CPU ms: the process time of the slowest "
        "rank's forward (what it computed, less sensitive to other jobs on the machine than the wall time). "
        "Held: resident memory the model's state adds "
        "(RSS after init_state with the [N, W] initial memory freed, less RSS after the imports); peaks include "
        "the initial memory each rank is given. Bytes: what one rank contributes to the collectives (a ring "
        "all_reduce moves 2 (P-1)/P of it per rank).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--model", choices=["sam", "sdnc"], default="sam")
    parser.add_argument("--index", default="exact")
    parser.add_argument("--slots", type=int, default=2**20)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--word-size", type=int, default=64)
    parser.add_argument("--reads", type=int, default=4)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds every collective waits")
    parser.add_argument("--run-timeout", type=float, default=1800.0, help="seconds a world size may take")
    parser.add_argument("--out", type=Path, default=OUT)
    # one rank (internal)
    parser.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--rank-out", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rank is not None:
        result = _rank(args)
        args.rank_out.write_text(json.dumps(result))
        return None
    config = {name: getattr(args, name) for name in CONFIG} | {"threads_per_rank": 1, "dtype": "float32"}
    load_before = _load()
    rows = []
    for world in args.world_sizes:
        for plain in [True, False] if world == 1 else [False]:
            rows.append({"P": world, "sharded": not plain, "ranks": _launch(args, world, plain)})
            print(json.dumps(rows[-1]["ranks"][0]), flush=True)
    payload = {**header(config), "load_before": load_before, "load_after": _load(), "rows": rows}
    stem = f"sharded_{args.model}_{args.index}_n{args.slots}"
    write_json(args.out / f"{stem}.json", payload)
    write_text(args.out / f"{stem}.md", _markdown(payload))
    return payload


if __name__ == "__main__":
    main()
