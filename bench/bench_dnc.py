"""The dense DNC step, forward and forward+backward: ms per step and peak memory, this checkout
against another one (e.g. a worktree of an older commit), side by side in one run.

    python -m bench.bench_dnc --baseline /path/to/older/worktree      # N = 2^10, 2^12
    python -m bench.bench_dnc --log2-slots 10                         # this checkout only
    python -m bench.bench_dnc --baseline DIR --log2-slots 5 7 --threads 1 --out bench/results/dnc_step_small.json

Config (issue 18): B = 8, X = 32, LSTM 128, W = 64, R = 4, T = 16, 2 threads; a fresh memory each
sequence; forward under no_grad, forward+backward with loss = mean(y^2); 1 warm-up + 3 timed
sequences, the median / T; large tensors reuse freed pages (`sm.keep_freed_memory()`, as training
runs, on both sides). Every (checkout, N, mode) runs in a fresh `python -m bench.bench_dnc
--case` process that imports sparsemem from that checkout (its compiled extension built there),
so its peak resident memory (VmHWM after the warm-up, reset) is its own; the cases alternate
between the checkouts so a change in the machine's load hits both.

Writes bench/results/dnc_step.json.
"""

import argparse
import json
import os
import sys
from pathlib import Path

CONFIG = dict(batch=8, input_size=32, hidden=128, word_size=64, num_reads=4, steps=16, threads=2, warmup=1, repeats=3)
MODES = ("fwd", "fwd+bwd")


def run_case(log2_slots: int, mode: str, threads: int) -> dict:
    """One (N, mode) with the sparsemem first on sys.path: ms per step and peak memory."""
    import torch

    import sparsemem as sm
    from bench.common import measured_median, time_sequences

    # as training runs: the 32 MiB links reuse freed pages. Every checkout bench.common imports under
    # (it needs sparsemem._files, 0a7d585) has keep_freed_memory (38f74b5), so both sides run alike.
    sm.keep_freed_memory()
    c = CONFIG
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    options = dict(num_slots=2**log2_slots, word_size=c["word_size"], num_reads=c["num_reads"])
    model = sm.DNC(c["input_size"], c["hidden"], **options)
    x = torch.randn(c["batch"], c["steps"], c["input_size"])

    seconds, peak = time_sequences(model, lambda: model(x)[0], mode == "fwd+bwd", c["warmup"], c["repeats"])
    return {
        "sparsemem": str(Path(sm.__file__).resolve().parent.parent),
        "log2_slots": log2_slots,
        "mode": mode,
        "sequence_seconds": seconds,
        "step_ms": measured_median(seconds) / c["steps"] * 1e3,
        "peak_bytes": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, help="another checkout to measure beside this one")
    parser.add_argument("--log2-slots", type=int, nargs="+", default=[10, 12])
    parser.add_argument("--case", nargs=3, metavar=("ROOT", "LOG2_SLOTS", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "dnc_step.json")
    parser.add_argument("--threads", type=int, default=CONFIG["threads"], help="torch's threads in each case")
    args = parser.parse_args()
    if args.case:
        root, log2_slots, mode = args.case
        sys.path.insert(0, root)  # before anything imports sparsemem: the case's checkout wins
        print(json.dumps(run_case(int(log2_slots), mode, args.threads)))
        return

    from bench.common import GIB, header, run_module, write_json

    here = Path(__file__).resolve().parent.parent
    roots = {"this": here, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    cases = []
    for log2_slots in args.log2_slots:
        for mode in MODES:
            for name, root in roots.items():
                case = ["--case", str(root), str(log2_slots), mode, "--threads", str(args.threads)]
                result = run_module("bench.bench_dnc", case, dict(os.environ))
                result["checkout"] = name
                cases.append(result)
                if "step_ms" in result:
                    result = f"{result['step_ms']:.1f} ms/step, peak {result['peak_bytes'] / GIB:.2f} GiB"
                print(f"{name:8s} N=2^{log2_slots} {mode:7s} {result}", flush=True)
    config = CONFIG | {"threads": args.threads}
    summary = {"header": header(config) | {"roots": {k: str(v) for k, v in roots.items()}}, "cases": cases}
    if args.baseline:
        ratios = {}
        for log2_slots in args.log2_slots:
            for mode in MODES:
                pair = {c["checkout"]: c for c in cases if c.get("log2_slots") == log2_slots and c.get("mode") == mode}
                if all("step_ms" in pair.get(k, {}) for k in roots):
                    ratios[f"2^{log2_slots} {mode}"] = {
                        "speedup": pair["baseline"]["step_ms"] / pair["this"]["step_ms"],
                        "peak_ratio": pair["baseline"]["peak_bytes"] / pair["this"]["peak_bytes"],
                    }
        summary["baseline_over_this"] = ratios
        print(json.dumps(ratios, indent=1))
    write_json(args.out, summary)


if __name__ == "__main__":
    main()
