"""Time each op, each backend that runs here, vs N: forward and forward+backward.

    python -m bench.ops.bench_ops [--ops allocation_weights,link_update] [--max-log2-slots 16]

Prints a table and writes bench/results/ops.json (with header) and ops.png.
"""

import argparse
import os
from pathlib import Path

import torch
from tqdm import tqdm

import sparsemem as sm
from bench.common import RESULTS, header, time_cpu, write_json
from sparsemem import _backends
from sparsemem.testing import OPS, op_inputs

QUADRATIC = {"link_update", "temporal_reads", "link_update_reads"}  # [B, N, N] inputs: capped lower


def run_case(op: str, backend: str, num_slots: int, config: dict) -> dict:
    os.environ["SPARSEMEM_BACKEND"] = backend
    fn = getattr(sm.ops, op)
    args = op_inputs(op, torch.float32, B=config["B"], N=num_slots, W=config["W"], R=config["R"])
    leaves = [a.requires_grad_(True) for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]

    def forward():
        with torch.no_grad():
            fn(*args)

    def forward_backward():
        outputs = fn(*args)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        loss = sum(o.float().sum() for o in outputs if o.is_floating_point())
        torch.autograd.grad(loss, leaves)

    return {
        "op": op,
        "backend": backend,
        "N": num_slots,
        "forward": time_cpu(forward),
        "forward_backward": time_cpu(forward_backward),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default=",".join(OPS), help="comma-separated op names")
    parser.add_argument("--min-log2-slots", type=int, default=10)
    parser.add_argument("--max-log2-slots", type=int, default=16)
    parser.add_argument("--max-log2-slots-links", type=int, default=11)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--word", type=int, default=64)
    parser.add_argument("--reads", type=int, default=4)
    parser.add_argument("--out", default=str(RESULTS / "ops.json"))
    args = parser.parse_args(argv)
    config = {"B": args.batch, "W": args.word, "R": args.reads, "dtype": "float32", "device": "cpu"}
    forced = os.environ.get("SPARSEMEM_BACKEND")
    cases = []
    for op in args.ops.split(","):
        top = args.max_log2_slots_links if op in QUADRATIC else args.max_log2_slots
        backends = [b for b in _backends._KERNELS[op] if _backends.availability()[b] is None]
        backends = [b for b in backends if _backends._runs_on(b, "cpu")]
        cases += [(op, b, 2**e) for b in backends for e in range(args.min_log2_slots, top + 1)]
    results = [run_case(op, b, n, config) for op, b, n in tqdm(cases, desc="ops", unit="case")]
    if forced is None:
        os.environ.pop("SPARSEMEM_BACKEND", None)
    else:
        os.environ["SPARSEMEM_BACKEND"] = forced
    print(f"\n{'op':<20}{'backend':<9}{'N':>9}{'fwd ms':>10}{'fwd+bwd ms':>12}")
    for r in results:
        fwd, fwd_bwd = r["forward"]["median"] * 1e3, r["forward_backward"]["median"] * 1e3
        print(f"{r['op']:<20}{r['backend']:<9}{r['N']:>9}{fwd:>10.3f}{fwd_bwd:>12.3f}")
    path = write_json(Path(args.out), {"header": header(config), "results": results})
    print(f"\nwrote {path}")
    return results


if __name__ == "__main__":
    main()
