"""pytorch-dnc (the peer, github.com/ixaxaar/pytorch-dnc, PyPI `dnc`) against sparsemem, side by
side: SAM, SDNC and DNC forward and forward+backward milliseconds per step, and their ratio.

    python -m bench.peers --peer-path DIR     # DIR: a checkout of pytorch-dnc (its dnc/ package inside)
    python -m bench.peers                     # the installed `dnc` package (pip install dnc)
    python -m bench.peers --full              # N = 2^10 .. 2^20, as far as the peer fits in memory

Without either the run is skipped with a message (exit code 0). Config (issue 18's table): B = 8,
X = 32, one LSTM layer of 128, W = 64, R = 4, K = 8 (SAM, SDNC), K_L = 8 (SDNC), T = 16, 2 threads
each side, a fresh memory every sequence (each side's own reset, inside the timed forward), the
sparse models on faiss-ivf with each side's own nlist / nprobe (the effective values are read back
from the peer's index). Forward: under torch.no_grad(); forward+backward: loss = mean(y^2),
backward, gradients dropped. 1 warm-up + 3 timed sequences per mode, the median sequence / T.
Each (side, model, N) runs in its own process (bench/common.py's run_in_process) under an address
space cap (half the memory available when it starts), so the sides share no threads, imports or
patches, and a size that does not fit fails alone ("out of memory") before it crowds the machine;
a side's series of a model stops at its first such failure.

The peer's FAISS code assumes GPU FAISS (faiss.StandardGpuResources, GpuIndexIVFFlat, and in the
1.1.0 release torch.cuda.synchronize around every call). In the peer's process only, before its
first FAISS call, patch_peer_faiss() adds what faiss-cpu lacks, without touching the peer's code:
GpuResources / StandardGpuResources stand-ins whose calls do nothing; GpuIndexIVFFlat(res,
[quantizer,] d, nlist, metric) -> a CPU IndexIVFFlat over an IndexFlatL2 quantizer, with
setNumProbes(n) setting nprobe; cast_integer_to_long_ptr -> cast_integer_to_idx_t_ptr (renamed
in faiss 1.7); torch.cuda.synchronize -> a no-op when there is no GPU. And one that is not about
GPUs: the GitHub head sets `index.nprobes = probes`, a misspelling of faiss's nprobe, which older
faiss kept as a plain attribute and faiss >= 1.12 refuses; IndexIVFFlat.nprobes is declared so it
is accepted and ignored as before (the head's indexes probe faiss's default nprobe, read back into
the result). The patches applied are listed in the result's header.

Writes bench/results/peers/summary.json, peers.md (the table) and peers.png.
"""

import argparse
import contextlib
import importlib.metadata
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.common import (
    GIB,
    RESULTS,
    PeakMemory,
    available_bytes,
    header,
    log2_label,
    log_axes,
    measured_median,
    pyplot,
    run_in_process,
    save_figure,
    write_json,
    write_text,
)
from sparsemem._malloc import keep_freed_memory

CONFIG = dict(batch=8, input_size=32, hidden=128, word_size=64, num_reads=4, k=8, link_k=8, steps=16)
CONFIG.update(threads=2, warmup=1, repeats=3)
MODELS = ("sam", "sdnc", "dnc")
NAMES = {"sam": "SAM", "sdnc": "SDNC", "dnc": "DNC"}
SHORT = (10, 12)
FULL = (10, 12, 14, 16, 18, 20)
SIDES = ("peer", "sparsemem")
MODES = ("fwd", "fwd+bwd")
OUT = RESULTS / "peers"
MEMORY_SHARE = 0.5  # of the memory available when a case starts: its address space cap (a shared machine)
PEER_URL = "https://github.com/ixaxaar/pytorch-dnc"
PEER_MODULE = "dnc"
SKIP_MESSAGE = (
    "bench.peers: pytorch-dnc is not importable here; skipped. Point it at a checkout with "
    f"--peer-path DIR (git clone {PEER_URL}; DIR holds its dnc/ package) or install its package (pip install dnc)."
)


# ---------------------------------------------------------------------------------------------
# The peer: where it is, the run-time FAISS patch, its models
# ---------------------------------------------------------------------------------------------


def find_peer(peer_path: str | None) -> dict | None:
    """{"path", "file", "version", "commit"} of the `dnc` package the peer's processes will import
    (from peer_path if given, else installed), or None when there is none; asked in a subprocess so
    this process never imports it."""
    code = f"import {PEER_MODULE} as dnc; print(dnc.__file__); dnc.DNC, dnc.SAM, dnc.SDNC"
    env = dict(os.environ)
    if peer_path is not None:
        if not (Path(peer_path) / PEER_MODULE / "__init__.py").is_file():
            return None
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(peer_path).resolve()), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        return None
    file = done.stdout.strip().splitlines()[-1]
    root = Path(file).resolve().parent.parent
    found = {"path": str(Path(peer_path).resolve()) if peer_path else None, "file": file}
    found.update(version=None, commit=None)
    if peer_path is None:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found["version"] = importlib.metadata.version(PEER_MODULE)
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if commit.returncode == 0:
        found["commit"] = commit.stdout.strip()
    return found


class _GpuResources:
    """faiss.StandardGpuResources for a faiss without GPUs: what the peer calls on it does nothing."""

    def setTempMemoryFraction(self, fraction: float) -> None:
        pass

    def initializeForDevice(self, device: int) -> None:
        pass


def patch_peer_faiss() -> list[str]:
    """Make the peer's GPU FAISS calls run on faiss-cpu (the module docstring says how); only what
    this faiss and torch lack is patched. -> the patches applied, for the result's header."""
    import faiss

    applied = []
    if not hasattr(faiss, "StandardGpuResources"):
        faiss.GpuResources = faiss.StandardGpuResources = _GpuResources
        applied.append("faiss.GpuResources / StandardGpuResources: stand-ins whose calls do nothing")
    if not hasattr(faiss, "GpuIndexIVFFlat"):

        class GpuIndexIVFFlat(faiss.IndexIVFFlat):
            def __init__(self, resources, *args):
                quantizer, args = (args[0], args[1:]) if isinstance(args[0], faiss.Index) else (None, args)
                dimension, nlist, metric = args
                super().__init__(quantizer or faiss.IndexFlatL2(dimension), dimension, nlist, metric)

            def setNumProbes(self, probes: int) -> None:
                self.nprobe = probes

        faiss.GpuIndexIVFFlat = GpuIndexIVFFlat
        applied.append("faiss.GpuIndexIVFFlat: a CPU IndexIVFFlat (IndexFlatL2 quantizer); setNumProbes sets nprobe")
    if not hasattr(faiss.IndexIVFFlat, "nprobes"):
        # the head sets index.nprobes (not faiss's nprobe): older faiss kept it as a plain Python
        # attribute, faiss >= 1.12 refuses unknown attributes; declared, it is kept and ignored again
        faiss.IndexIVFFlat.nprobes = None
        applied.append(
            "faiss.IndexIVFFlat.nprobes declared: the peer's `index.nprobes = probes` (not faiss's nprobe) "
            "is accepted and ignored, as older faiss did, so its indexes probe faiss's default nprobe"
        )
    if not hasattr(faiss, "cast_integer_to_long_ptr"):
        faiss.cast_integer_to_long_ptr = faiss.cast_integer_to_idx_t_ptr
        applied.append("faiss.cast_integer_to_long_ptr: faiss.cast_integer_to_idx_t_ptr")
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda device=None: None
        applied.append("torch.cuda.synchronize: a no-op (no GPU)")
    return applied


def _peer_model(name: str, num_slots: int, c: dict) -> torch.nn.Module:
    import inspect

    import dnc

    options = dict(
        input_size=c["input_size"],
        hidden_size=c["hidden"],
        rnn_type="lstm",
        num_layers=1,
        num_hidden_layers=1,
        nr_cells=num_slots,
        read_heads=c["num_reads"],
        cell_size=c["word_size"],
        batch_first=True,
    )
    if name != "dnc":
        options["sparse_reads"] = c["k"]
    if name == "sdnc":
        options["temporal_reads"] = c["link_k"]
    cls = {"sam": dnc.SAM, "sdnc": dnc.SDNC, "dnc": dnc.DNC}[name]
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{key: value for key, value in options.items() if key in accepted})


def _detached(hidden):
    """The peer's memory state with its tensors cut from the last sequence's graph (indexes kept)."""
    if isinstance(hidden, dict):
        return {key: _detached(value) for key, value in hidden.items()}
    if isinstance(hidden, list | tuple):
        return type(hidden)(_detached(value) for value in hidden)
    return hidden.detach() if isinstance(hidden, torch.Tensor) else hidden


def _index_settings(memory_hidden) -> dict:
    """nlist and nprobe of the peer's first FAISS index, as faiss holds them (None for the DNC)."""
    # the GitHub head keeps a list of memory states (one per layer), PyPI 1.1.0 the state itself
    hidden = memory_hidden[0] if isinstance(memory_hidden, list) and memory_hidden else memory_hidden
    if not isinstance(hidden, dict) or not hidden.get("indexes"):
        return {}
    index = getattr(hidden["indexes"][0], "index", None)
    if index is None or not hasattr(index, "nlist"):
        return {}
    return {"nlist": int(index.nlist), "nprobe": int(index.nprobe)}


# ---------------------------------------------------------------------------------------------
# One case: a side, a model, an N, in its own process
# ---------------------------------------------------------------------------------------------


def _sequences(run, mode: str, peak: PeakMemory, config: dict) -> dict:
    """warm-up + timed sequences of run(grad) -> seconds per sequence, ms per step, peak memory."""
    grad = mode == "fwd+bwd"
    for _ in range(config["warmup"]):
        run(grad)
    peak.reset_peak()
    seconds = []
    for _ in range(config["repeats"]):
        started = time.perf_counter()
        run(grad)
        seconds.append(time.perf_counter() - started)
    step_ms = measured_median(seconds) / config["steps"] * 1e3
    return {"sequence_seconds": seconds, "step_ms": step_ms, "peak_bytes": peak.peak()}


def run_case(side: str, name: str, log2_slots: int, peer_path: str | None, config: dict = CONFIG) -> dict:
    """Forward and forward+backward of one (side, model, N): ms per step and peak memory of each."""
    c = config
    torch.set_num_threads(c["threads"])
    # both sides' processes keep freed memory in the heap, as sparsemem's CLIs do (sparsemem/_malloc.py):
    # the N x N links each step allocates reuse pages instead of faulting in fresh ones, on either side
    keep_freed_memory()
    torch.manual_seed(0)
    num_slots = 2**log2_slots
    x = torch.randn(c["batch"], c["steps"], c["input_size"])
    result = {"side": side, "model": name, "log2_slots": log2_slots}
    if side == "peer":
        if peer_path is not None:
            sys.path.insert(0, str(Path(peer_path).resolve()))
        result["patches"] = patch_peer_faiss()
        model = _peer_model(name, num_slots, c)
        memory_hidden = [None]

        def run(grad: bool) -> None:
            # a fresh memory each sequence: the DNC's made anew, the sparse ones' reset (their
            # FAISS indexes emptied, not retrained: the peer's own reset_experience path)
            hidden = (None, None if name == "dnc" else memory_hidden[0], None)
            with torch.set_grad_enabled(grad):
                y, (_, memory, _) = model(x, hidden, reset_experience=True)
                if grad:
                    y.square().mean().backward()
                    model.zero_grad(set_to_none=True)
            memory_hidden[0] = _detached(memory)

    else:
        import sparsemem as sm

        options = dict(num_slots=num_slots, word_size=c["word_size"], num_reads=c["num_reads"])
        if name != "dnc":
            options.update(k=c["k"], index="faiss-ivf")
        if name == "sdnc":
            options["link_k"] = c["link_k"]
        model = {"sam": sm.SAM, "sdnc": sm.SDNC, "dnc": sm.DNC}[name](c["input_size"], c["hidden"], **options)

        def run(grad: bool) -> None:
            with torch.set_grad_enabled(grad):
                y, _ = model(x)  # state None: a fresh memory
                if grad:
                    y.square().mean().backward()
                    model.zero_grad(set_to_none=True)

    peak = PeakMemory(torch.device("cpu"))
    for mode in MODES:
        try:
            result[mode] = _sequences(run, mode, peak, c)
        except Exception as error:  # a mode a side cannot run is its result (PyPI dnc 1.1.0's sparse backward)
            result[mode] = {"failure": _failure({"status": "error", "reason": f"{type(error).__name__}: {error}"})}
    if side == "peer":
        result["index"] = _index_settings(memory_hidden[0])
    return result


def _failure(result: dict) -> str | None:
    """None for a case that ran, else what stopped it: "out of memory", or status: reason."""
    if "status" not in result:
        return None
    reason = str(result.get("reason", ""))
    memory_words = ("MemoryError", "can't allocate", "cannot allocate", "out of memory", "killed by signal 9")
    if any(word in reason for word in memory_words):
        return "out of memory"
    return f"{result['status']}: {reason}"


def _stops_series(result: dict) -> str | None:
    """Why a side's larger N are not run after this case: it failed as a whole (a timeout, a dead
    process) or a mode ran out of memory. A mode that fails otherwise fails at every N; the other
    mode goes on being measured."""
    if "failure" in result:
        return result["failure"]
    memory = [result[m]["failure"] for m in MODES if result.get(m, {}).get("failure") == "out of memory"]
    return memory[0] if memory else None


# ---------------------------------------------------------------------------------------------
# The table and the plot
# ---------------------------------------------------------------------------------------------


def table_rows(cases: list[dict]) -> list[dict]:
    """One row per (model, N): each side's fwd and fwd+bwd ms (None with what failed instead), peak
    memory, and the fwd+bwd ratio peer / sparsemem."""
    found = {(c["side"], c["model"], c["log2_slots"]): c for c in cases}
    rows = []
    for name in MODELS:
        for log2_slots in sorted({c["log2_slots"] for c in cases if c["model"] == name}):
            row = {"model": name, "log2_slots": log2_slots}
            for side in SIDES:
                case = found.get((side, name, log2_slots), {"failure": "not run"})
                for mode in MODES:
                    measured = case.get(mode, {})
                    row[f"{side}_{mode}_ms"] = measured.get("step_ms")
                    row[f"{side}_{mode}_peak_gib"] = measured["peak_bytes"] / GIB if "peak_bytes" in measured else None
                    row[f"{side}_{mode}_failure"] = case.get("failure") or measured.get("failure")
            slow, fast = row["peer_fwd+bwd_ms"], row["sparsemem_fwd+bwd_ms"]
            row["ratio"] = slow / fast if slow and fast else None
            rows.append(row)
    return rows


def _load_line(load: dict) -> str:
    if "start" not in load:
        return f"load average: {load.get('note', 'not recorded')}"
    return f"load average (1 min) at the start and end: {load['start'][0]:.1f}, {load['end'][0]:.1f}"


def markdown(rows: list[dict], run_header: dict) -> str:
    def cell(row: dict, side: str, mode: str) -> str:
        if row[f"{side}_{mode}_ms"] is not None:
            return f"{row[f'{side}_{mode}_ms']:.2f}"
        failure = row[f"{side}_{mode}_failure"] or "-"
        return failure if failure in ("out of memory", "not run") else failure.split(":")[0]  # the notes say more

    def pair(row: dict, side: str) -> str:
        return " / ".join(cell(row, side, mode) for mode in MODES)

    c = run_header["config"]
    peer = run_header["peer"]
    source = peer["file"]
    if peer["commit"] or peer["version"]:
        source = f"commit {peer['commit']}" if peer["commit"] else f"dnc {peer['version']}"
    lines = [
        f"pytorch-dnc ({source}) against sparsemem ({run_header['commit']}); {run_header['cpu']}, "
        f"{c['threads']} threads each, torch {run_header['torch']}",
        f"B={c['batch']}, X={c['input_size']}, LSTM {c['hidden']}, W={c['word_size']}, R={c['num_reads']}, "
        f"K={c['k']}, K_L={c['link_k']}, T={c['steps']}; fresh memory; faiss-ivf, each side's nlist/nprobe; "
        f"{c['warmup']} warm-up + {c['repeats']} timed sequences, median per step",
        f"peer's FAISS patched at run time: {'; '.join(run_header['patches']) or 'nothing needed'}",
        _load_line(run_header.get("load_average", {})),
        "",
        "| model, N | pytorch-dnc fwd / fwd+bwd ms | sparsemem fwd / fwd+bwd ms | ratio (fwd+bwd) |",
        "|---|---|---|---|",
    ]
    failures = {}
    for row in rows:
        ratio = f"{row['ratio']:.1f}x" if row["ratio"] else "-"
        lines.append(
            f"| {NAMES[row['model']]}, {log2_label(2 ** row['log2_slots'])} | {pair(row, 'peer')} | "
            f"{pair(row, 'sparsemem')} | {ratio} |"
        )
        for side in SIDES:
            for mode in MODES:
                failure = row[f"{side}_{mode}_failure"]
                if failure and failure not in ("out of memory", "not run"):
                    failures.setdefault(failure, []).append(f"{side} {NAMES[row['model']]} {mode}")
    if failures:
        lines.append("")
        lines.extend(f"- {', '.join(where)}: {failure}" for failure, where in failures.items())
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> Path:
    """One panel per model measured; where the peer's series ends in a failure (out of memory), an x
    at that N on the last time it had, labelled with the failure."""
    plt = pyplot()
    models = [name for name in MODELS if any(row["model"] == name for row in rows)]
    figure, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.6), squeeze=False)
    for axis, name in zip(axes[0], models, strict=True):
        mine = [row for row in rows if row["model"] == name]
        for side, style in (("peer", "s--"), ("sparsemem", "o-")):
            for mode, alpha in (("fwd", 0.5), ("fwd+bwd", 1.0)):
                points = [(2 ** r["log2_slots"], r[f"{side}_{mode}_ms"]) for r in mine if r[f"{side}_{mode}_ms"]]
                if points:
                    label = f"{'pytorch-dnc' if side == 'peer' else side} {mode}"
                    axis.plot(*zip(*points, strict=True), style, alpha=alpha, label=label)
        failed = [r for r in mine if r["peer_fwd+bwd_failure"] not in (None, "not run")]
        measured = [r["peer_fwd+bwd_ms"] for r in mine if r["peer_fwd+bwd_ms"]]
        if failed and measured:
            first = failed[0]
            axis.plot(
                2 ** first["log2_slots"],
                measured[-1],
                "kx",
                markersize=9,
                label=f"pytorch-dnc: {first['peer_fwd+bwd_failure']}",
            )
        log_axes(axis, title=NAMES[name])
        axis.set_ylabel("ms per step")
        axis.legend(fontsize=7)
    figure.tight_layout()
    return save_figure(figure, path, dpi=110)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def run(
    peer_path: str | None,
    sizes: tuple[int, ...],
    models: tuple[str, ...],
    out: Path,
    timeout: float,
    config: dict = CONFIG,
) -> dict | None:
    """Every (model, N, side) case, each side's series of a model stopping at its first failure.
    -> the summary written to out (None, and nothing written, when the peer is not importable).
    config: CONFIG (the tests pass a shorter one)."""
    peer = find_peer(peer_path)
    if peer is None:
        where = "" if peer_path is None else f" (--peer-path {peer_path} holds no importable {PEER_MODULE}/ package)"
        print(SKIP_MESSAGE.replace("; skipped.", f"{where}; skipped."))
        return None
    cases, patches, load, budgets = [], set(), {"start": os.getloadavg()}, []
    for name in models:
        stopped = {side: None for side in SIDES}
        for log2_slots in sizes:
            for side in SIDES:
                if stopped[side]:
                    cases.append({"side": side, "model": name, "log2_slots": log2_slots, "failure": "not run"})
                    continue
                budget = int(MEMORY_SHARE * available_bytes("cpu"))
                budgets.append(budget)
                result = run_in_process(run_case, (side, name, log2_slots, peer_path, config), timeout, budget)
                failure = _failure(result)
                if failure:
                    result = {"side": side, "model": name, "log2_slots": log2_slots, "failure": failure, **result}
                stopped[side] = _stops_series(result)
                patches.update(result.get("patches", ()))
                cases.append(result)
                print(json.dumps({k: v for k, v in result.items() if k not in ("patches",)}), flush=True)
    run_header = header(config)
    run_header["peer"] = peer
    run_header["patches"] = sorted(patches)
    run_header["load_average"] = {**load, "end": os.getloadavg()}  # a shared machine: 1, 5, 15 min
    run_header["memory_budget_gib"] = [round(min(budgets) / GIB, 1), round(max(budgets) / GIB, 1)]
    rows = table_rows(cases)
    summary = {"header": run_header, "rows": rows, "cases": cases}
    write_json(out / "summary.json", summary)
    table = markdown(rows, run_header)
    write_text(out / "peers.md", table)
    plot(rows, out / "peers.png")
    print(table)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer-path", help="a checkout of pytorch-dnc (default: the installed dnc package)")
    parser.add_argument("--full", action="store_true", help=f"N = 2^{FULL[0]} .. 2^{FULL[-1]} (default 2^10, 2^12)")
    parser.add_argument("--log2-slots", type=int, nargs="+", help="these N = 2^k instead")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per case (default 1800)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    sizes = tuple(args.log2_slots) if args.log2_slots else FULL if args.full else SHORT
    run(args.peer_path, sizes, tuple(args.models), args.out, args.timeout)


if __name__ == "__main__":
    main()
