"""bench/gpu_check.sh, the GPU checks as one command for a lent GPU machine: its plumbing (stages
chosen by STAGES, a log and a summary line each, the first failure's exit status) on any machine,
through the one stage that needs no GPU."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run(tmp_path: Path, stages: str, python: str = sys.executable) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(tmp_path / "out"), "STAGES": stages, "PYTHON": python}
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)


def test_the_stages_named_run_each_with_its_log_and_summary_line(tmp_path):
    done = run(tmp_path, "device")
    assert done.returncode == 0, done.stderr
    summary = (tmp_path / "out" / "summary.txt").read_text().splitlines()
    assert summary[0].startswith("device: exit 0 in ") and summary[-1] == "gpu_check: exit 0"
    assert "torch" in (tmp_path / "out" / "device.log").read_text()
    assert not (tmp_path / "out" / "build.log").exists()  # only the stages named


def test_a_failed_stage_is_reported_and_its_status_returned(tmp_path):
    done = run(tmp_path, "device", python="false")
    assert done.returncode == 1
    assert (tmp_path / "out" / "summary.txt").read_text().splitlines()[-1] == "gpu_check: exit 1"


def test_an_unknown_stage_is_refused_before_anything_runs(tmp_path):
    done = run(tmp_path, "device benchmarks")
    assert done.returncode == 2 and "unknown stage 'benchmarks'" in done.stderr
    assert not (tmp_path / "out").exists()
