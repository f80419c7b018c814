"""bench/bench_dnc.py at a tiny N: a case measures both modes of this checkout's DNC."""

from pathlib import Path

import pytest

from bench.bench_dnc import run_case


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_a_case_times_this_checkouts_dnc(mode, one_thread):
    result = run_case(5, mode, threads=1)
    assert Path(result["sparsemem"]) == Path(__file__).resolve().parent.parent
    assert result["mode"] == mode and result["log2_slots"] == 5
    assert len(result["sequence_seconds"]) == 3 and all(s > 0 for s in result["sequence_seconds"])
    assert result["step_ms"] == pytest.approx(sorted(result["sequence_seconds"])[1] / 16 * 1e3)
    assert result["peak_bytes"] > 0
