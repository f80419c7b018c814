"""bench/scaling.py: the memory plan, the budgets, and a run on tiny sizes."""

import json

import pytest

import sparsemem as sm
from bench import scaling

TINY = [
    "--min-slots", "2^4", "--max-slots", "2^5", "--log2-step", "1",
    "--batch", "2", "--word", "8", "--reads", "2", "--k", "2", "--steps", "2", "--hidden", "8", "--inputs", "3",
    "--min-run-time", "0", "--timeout", "120", "--memory-gib", "1",
]  # fmt: skip


def test_estimate_follows_each_models_memory():
    config = scaling.Config()

    def growth(model, index, regime):
        small, large = (scaling.estimate_bytes(scaling.Case(model, index, regime, n), config) for n in (2**16, 2**17))
        return large / small

    assert growth("DNC", None, "fresh") == pytest.approx(4, rel=0.02)  # the [B, N, N] links dominate
    assert growth("NTM", None, "fresh") == pytest.approx(2)
    assert growth("SAM", "exact", "full") == pytest.approx(2)
    dnc = scaling.estimate_bytes(scaling.Case("DNC", None, "fresh", 2**16), config)
    assert dnc > 2**40  # far over any machine here: skipped, never attempted
    sam = scaling.estimate_bytes(scaling.Case("SAM", "faiss-hnsw", "fresh", 2**20), config)
    assert sam < 2**30


def test_cases_over_the_memory_budget_are_skipped_without_running():
    cases = [scaling.Case("DNC", None, "fresh", 2**10), scaling.Case("NTM", None, "full", 2**10)]
    results = scaling.run_cases(cases, scaling.Config(), memory_budget=2**20, timeout=1)
    for result in results:
        if hasattr(sm, result["model"]):
            assert result["status"] == "skipped"
            assert result["reason"].startswith("needs ")
        else:
            assert result["status"] == "not available"


@pytest.mark.slow
def test_slow_case_times_out_and_stops_its_series(tmp_path):
    if not hasattr(sm, "NTM"):
        pytest.skip("sparsemem has no NTM yet")
    out = tmp_path / "scaling.json"
    # 5000 steps of a tiny NTM: far more than 0.2 s anywhere, a few MiB of memory
    tiny = [*TINY, "--batch", "1", "--word", "4", "--steps", "5000"]
    args = [*tiny, "--models", "NTM", "--regimes", "fresh", "--timeout", "0.2", "--no-plot", "--out", str(out)]
    statuses = [(r["status"], r.get("reason")) for r in scaling.main(args)["cases"]]
    assert statuses == [("timeout", "over 0.2 s"), ("skipped", "after timeout at N=2^4")]


@pytest.mark.slow
def test_smoke_run_writes_json_table_and_plots(tmp_path):
    out = tmp_path / "scaling.json"
    payload = scaling.main([*TINY, "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(payload))

    header = payload["header"]
    assert {"machine", "cpu", "torch", "commit", "config"} <= set(header)
    assert header["config"]["batch"] == 2 and header["config"]["command"].startswith("python -m bench.scaling")

    cases = payload["cases"]
    series = {(c["model"], c["index"], c["regime"]) for c in cases}
    expected = [(m, None) for m in scaling.DENSE] + [
        (m, i) for m in scaling.SPARSE for i in scaling.DEFAULT_INDEXES["cpu"]
    ]
    assert series == {(m, i, regime) for m, i in expected for regime in scaling.REGIMES}
    for case in cases:
        assert case["num_slots"] in (16, 32) and case["estimate_bytes"] > 0
        if case["status"] == "ok":
            for phase in ("forward", "forward_backward"):
                assert case[phase]["median"] > 0 and case[phase]["runs"] >= 1
                assert case["memory"][phase] >= 0
            assert case["init"]["seconds"] >= 0
        else:
            assert case["status"] in ("not available", "skipped", "timeout", "error")
            assert case["reason"]
        if hasattr(sm, case["model"]) and case["index"] in (None, "exact"):
            # every model the installed sparsemem has must run here; only faiss may be missing
            assert case["status"] == "ok", case
        if not hasattr(sm, case["model"]):
            assert case["status"] == "not available"

    for row in payload["slopes"]:
        assert set(row) == {"series", "regime", "sizes", "forward", "forward_backward", "memory"}
        if len(row["sizes"]) >= 2:
            assert row["forward"] is not None and row["forward_backward"] is not None

    assert payload["plots"] == ["scaling-time.png", "scaling-memory.png"]
    for name in payload["plots"]:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "scaling.md").read_text()
    assert table.startswith("| model | regime | N |") and "Slopes" in table
    assert "| N | NTM | DNC | SAM/exact |" in table  # the per-regime pivot


def test_ivf_index_runs_when_asked(tmp_path):
    out = tmp_path / "scaling.json"
    args = [*TINY, "--models", "SAM", "--indexes", "ivf", "--regimes", "fresh", "--no-plot", "--out", str(out)]
    cases = scaling.main(args)["cases"]
    assert {(c["model"], c["index"]) for c in cases} == {("SAM", "ivf")}
    assert all(c["status"] == "ok" and c["forward_backward"]["median"] > 0 for c in cases)
