"""bench/bench_sam.py at a tiny N: a case times SAM's (SDNC's) one op or its step loop, and the table pairs them."""

import pytest

from bench.bench_sam import markdown, run_case


@pytest.mark.parametrize("model", ["sam", "sdnc"])
@pytest.mark.parametrize("regime", ["fresh", "full"])
def test_cases_time_both_paths_and_the_table_pairs_them(model, regime, one_thread):
    paths, modes = ("step loop", "one op"), ("fwd", "fwd+bwd")
    cases = [run_case(model, path, 5, regime, mode, threads=1) for path in paths for mode in modes]
    for case in cases:
        assert case["model"] == model and case["regime"] == regime and case["log2_slots"] == 5
        assert len(case["sequence_seconds"]) == 5 and all(s > 0 for s in case["sequence_seconds"])
        assert case["step_ms"] == pytest.approx(sorted(case["sequence_seconds"])[2] / 16 * 1e3)
        assert case["peak_bytes"] > 0
    table = markdown([*cases, {"args": ["--case"], "error": "out of memory"}])
    assert table.count(f"| 2^5 | {regime} |") == 1 and table.rstrip().endswith("x |")
