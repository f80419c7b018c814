"""What every benchmark shares: the result header, timing, and atomic JSON output."""

import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.utils.benchmark as torch_benchmark

RESULTS = Path(__file__).resolve().parent / "results"


def header(config: dict) -> dict:
    """Machine, CPU, torch, commit and the run's config: carried by every result file."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, cwd=RESULTS.parent
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "machine": platform.node(),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "commit": commit,
        "config": config,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def time_cpu(fn, min_run_time: float = 0.2) -> dict:
    """Median, interquartile range and the 10/25/75/90% quantiles in seconds, from
    torch.utils.benchmark (adaptive repeats)."""
    measurement = torch_benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    times = torch.tensor(measurement.times, dtype=torch.float64)
    quantiles = torch.quantile(times, torch.tensor([0.1, 0.25, 0.75, 0.9], dtype=torch.float64)).tolist()
    return {
        "median": measurement.median,
        "iqr": measurement.iqr,
        **{f"q{int(q * 100)}": value for q, value in zip((0.1, 0.25, 0.75, 0.9), quantiles, strict=True)},
        "runs": len(measurement.times),
    }


def time_gpu(fn) -> dict:
    """Median and 20/80% quantiles in seconds, from triton.testing.do_bench (CUDA events, L2 flushed)."""
    from triton.testing import do_bench

    q20, median, q80 = do_bench(fn, quantiles=[0.2, 0.5, 0.8])
    return {"median": median / 1e3, "q20": q20 / 1e3, "q80": q80 / 1e3}


def copy_bandwidth(num_bytes: int = 2**30) -> float:
    """Device-to-device copy bandwidth in bytes per second (read + write), the GPU's roofline for ops."""
    source = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    return 2 * num_bytes / time_gpu(lambda: target.copy_(source))["median"]


def write_json(path: Path, payload: dict) -> Path:
    """Writes atomically (temp file + rename), so an interrupted run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
        json.dump(payload, handle, indent=2)
    os.replace(handle.name, path)
    return path
