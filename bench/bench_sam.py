"""SAM's (or SDNC's) steps as one op (ops.sam_sequence, sdnc_sequence) against its step loop: ms per
step, forward and forward+backward, and peak memory, side by side in one run.

    python -m bench.bench_sam                          # SAM, N = 2^10, 2^12, 2^13; fresh and full
    python -m bench.bench_sam --log2-slots 10 --regimes fresh
    python -m bench.bench_sam --model sdnc             # SDNC (K_L = 8)

Config (issue 18's): B = 8, X = 32, LSTM 128, W = 64, R = 4, K = 8, T = 16, 2 threads, the exact
index, `sm.keep_freed_memory()` as training runs; fresh: a new memory each sequence, full: every
slot preloaded with a unit word (`init_state(B, memory=M)`) each sequence. Forward under no_grad,
forward+backward with loss = mean(y^2); 1 warm-up + 5 timed sequences, the median / T. The step
loop is the same model with `SAMMemory.sequence_max_slots = None`. Every (path, N, regime, mode)
runs in a fresh process (its peak resident memory its own: VmHWM after the warm-up, reset), the
two paths alternating so a change in the machine's load hits both.

Writes bench/results/sam_one_op.json (sdnc_one_op.json).
"""

import argparse
import json
import os
from pathlib import Path

CONFIG = dict(batch=8, input_size=32, hidden=128, word_size=64, num_reads=4, k=8, link_k=8, steps=16, threads=2)
CONFIG |= dict(warmup=1, repeats=5)
MODES = ("fwd", "fwd+bwd")
PATHS = ("step loop", "one op")
REGIMES = ("fresh", "full")


def run_case(model_name: str, path: str, log2_slots: int, regime: str, mode: str, threads: int) -> dict:
    """One (model, path, N, regime, mode) in this process: ms per step and peak memory."""
    import torch

    import sparsemem as sm
    from bench.common import measured_median, time_sequences

    c, num_slots = CONFIG, 2**log2_slots
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    sizes = dict(num_slots=num_slots, word_size=c["word_size"], num_reads=c["num_reads"], k=c["k"])
    if model_name == "sdnc":
        model = sm.SDNC(c["input_size"], c["hidden"], **sizes, link_k=c["link_k"])
    else:
        model = sm.SAM(c["input_size"], c["hidden"], **sizes)
    model.memory.sequence_max_slots = num_slots if path == "one op" else None
    x = torch.randn(c["batch"], c["steps"], c["input_size"])
    words = torch.nn.functional.normalize(torch.randn(c["batch"], num_slots, c["word_size"]), dim=-1)

    def forward() -> torch.Tensor:
        return model(x, model.init_state(c["batch"], memory=words if regime == "full" else None))[0]

    seconds, peak = time_sequences(model, forward, mode == "fwd+bwd", c["warmup"], c["repeats"])
    return {
        "model": model_name,
        "path": path,
        "log2_slots": log2_slots,
        "regime": regime,
        "mode": mode,
        "sequence_seconds": seconds,
        "step_ms": measured_median(seconds) / c["steps"] * 1e3,
        "peak_bytes": peak,
    }


def markdown(cases: list[dict]) -> str:
    """Step loop against one op, ms per step, one row per (N, regime)."""
    lines = [
        "| N | regime | step loop fwd / fwd+bwd ms | one op fwd / fwd+bwd ms | speed-up (fwd+bwd) |",
        "|---|---|---|---|---|",
    ]
    keys = sorted({(c["log2_slots"], c["regime"]) for c in cases if "step_ms" in c})
    for log2_slots, regime in keys:
        ms = {
            (c["path"], c["mode"]): c["step_ms"]
            for c in cases
            if c.get("log2_slots") == log2_slots and c.get("regime") == regime and "step_ms" in c
        }
        if len(ms) < len(PATHS) * len(MODES):
            continue
        loop, op = (f"{ms[p, 'fwd']:.2f} / {ms[p, 'fwd+bwd']:.2f}" for p in PATHS)
        ratio = ms["step loop", "fwd+bwd"] / ms["one op", "fwd+bwd"]
        lines.append(f"| 2^{log2_slots} | {regime} | {loop} | {op} | {ratio:.1f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log2-slots", type=int, nargs="+", default=[10, 12, 13])
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=REGIMES)
    parser.add_argument("--model", default="sam", choices=("sam", "sdnc"))
    parser.add_argument("--case", nargs=4, metavar=("PATH", "LOG2_SLOTS", "REGIME", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help="default: bench/results/<model>_one_op.json")
    parser.add_argument("--threads", type=int, default=CONFIG["threads"], help="torch's threads in each case")
    args = parser.parse_args()
    if args.case:
        import sparsemem as sm

        sm.keep_freed_memory()  # as training runs: large tensors reuse freed pages
        path, log2_slots, regime, mode = args.case
        print(json.dumps(run_case(args.model, path, int(log2_slots), regime, mode, args.threads)))
        return

    from bench.common import header, run_module, write_json

    cases = []
    for log2_slots in args.log2_slots:
        for regime in args.regimes:
            for mode in MODES:
                for path in PATHS:
                    case = ["--model", args.model, "--case", path, str(log2_slots), regime, mode]
                    case += ["--threads", str(args.threads)]
                    result = run_module("bench.bench_sam", case, dict(os.environ))
                    cases.append(result)
                    shown = f"{result['step_ms']:.2f} ms/step" if "step_ms" in result else result
                    print(f"2^{log2_slots} {regime:5s} {mode:7s} {path:9s} {shown}", flush=True)
    table = markdown(cases)
    print(table)
    out = args.out or Path(__file__).resolve().parent / "results" / f"{args.model}_one_op.json"
    config = CONFIG | {"threads": args.threads, "model": args.model}
    write_json(out, {"header": header(config), "cases": cases, "table": table})


if __name__ == "__main__":
    main()
