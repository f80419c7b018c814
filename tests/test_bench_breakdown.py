"""bench/bench_breakdown.py on a tiny memory: every region of a step is found and the shares add up."""

import json
import math
import subprocess
import sys

import pytest

from bench.bench_breakdown import CATEGORIES, markdown, parse_case, profile_case, profile_markdown, run_case
from tests.conftest import sparse_step_loops


@pytest.mark.parametrize("name", ["sam", "sdnc"])
def test_breakdown_finds_every_region_of_a_step(name, one_thread, monkeypatch):
    monkeypatch.delenv("SPARSEMEM_BACKEND", raising=False)  # the default backends' row
    # the step loop's regions: at this N (the bench's own start at 2^16) sm.SAM and sm.SDNC run one op
    sparse_step_loops(monkeypatch)
    result = run_case(name, 8, "exact", repeats=1)
    shares = result["shares"]
    assert set(shares) == set(CATEGORIES)
    assert math.isclose(sum(shares.values()), 1.0)
    assert all(share >= 0 for share in shares.values())
    for region in ("index.search", "index.update", "controller", "memory.write", "memory.read", "backward"):
        assert shares[region] > 0, region
    assert (shares["memory.links"] > 0) == (name == "sdnc")
    torch_case = {**result, "backend": "torch", "episode_seconds": [2 * t for t in result["episode_seconds"]]}
    table = markdown([result, torch_case], {"steps": 16})
    assert "| SDNC | default | exact |" in table or "| SAM | default | exact |" in table
    assert "| 2.00x |" in table


@pytest.mark.slow
@pytest.mark.parametrize("case", ["sam:6:fresh:exact", "sdnc:6:full:exact", "dnc:4"])
def test_profile_counts_ops_and_splits_kernel_from_python_time(case, one_thread):
    name, log2_slots, regime, index = parse_case(case)
    result = profile_case(name, log2_slots, regime, index, repeats=1)
    for phase in ("forward", "backward"):
        assert result["ops_per_step"][phase] > 10, phase  # a step is many small ops, not one
        ms = result["ms_per_step"][phase]
        kernel, python = result["kernel_ms_per_step"][phase], result["python_ms_per_step"][phase]
        assert 0 < kernel <= ms and math.isclose(kernel + python, ms)
    assert (result["recall_at_k"] is not None) == (regime == "full")
    if regime == "full":
        assert result["recall_at_k"] == 1.0  # the exact index finds the exact top K
    table = profile_markdown([result], {"steps": 16})
    assert f"| {name.upper()} | 2^{log2_slots} |" in table


@pytest.mark.slow
def test_the_profile_goes_where_out_says(tmp_path):
    out = tmp_path / "profile.json"
    command = [sys.executable, "-m", "bench.bench_breakdown", "--profile", "--cases", "dnc:4", "--repeats", "1"]
    subprocess.run([*command, "--threads", "1", "--out", str(out)], check=True, capture_output=True, timeout=600)
    (result,) = json.loads(out.read_text())["results"]
    assert (result["model"], result["log2_slots"]) == ("dnc", 4)
    assert "| DNC | 2^4 |" in out.with_suffix(".md").read_text()
