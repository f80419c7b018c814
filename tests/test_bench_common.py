"""bench/common.py: the slope fit, the time prediction, subprocesses, atomic writes, the provenance line."""

import math
import random

import pytest

from bench.common import fit_slope, predict_seconds, run_module, trained_at, write_text


@pytest.mark.parametrize("exponent", [0.0, 0.5, 1.0, 2.0])
def test_fit_slope_recovers_the_exponent(exponent):
    sizes = [2**e for e in range(10, 21)]
    assert fit_slope(sizes, [3e-4 * n**exponent for n in sizes]) == pytest.approx(exponent, abs=1e-9)
    noise = random.Random(0)
    noisy = [3e-4 * n**exponent * math.exp(noise.gauss(0, 0.1)) for n in sizes]
    assert fit_slope(sizes, noisy) == pytest.approx(exponent, abs=0.05)


def test_fit_slope_needs_two_sizes_with_positive_values():
    assert fit_slope([1024], [1.0]) is None
    assert fit_slope([1024, 2048], [1.0, 0.0]) is None
    assert fit_slope([1024, 1024], [1.0, 2.0]) is None


def test_prediction_extrapolates_the_last_two_sizes():
    assert predict_seconds([(1024, 1.0)], 2048) is None
    assert predict_seconds([(1024, 1.0), (2048, 4.0)], 4096) == pytest.approx(16.0)
    assert predict_seconds([(1024, 2.0), (2048, 1.0)], 4096) == pytest.approx(1.0)  # never falls


def test_a_failed_module_run_reports_its_last_error_line():
    result = run_module("bench.no_such_bench", ["--x"])
    assert result["args"] == ["--x"]
    assert "No module named bench.no_such_bench" in result["error"]


def test_write_text_is_atomic_and_makes_the_folder(tmp_path):
    path = write_text(tmp_path / "deep" / "table.md", "| a |\n")
    assert path.read_text() == "| a |\n"
    assert [p.name for p in path.parent.iterdir()] == ["table.md"]


def test_trained_at_names_the_commits_and_the_load_range():
    session = {"commit": "abc1234", "steps": [0, 10], "load_average": [1.0, 2.0, 3.0]}
    runs = [
        {"sessions": [session, session | {"commit": "def5678", "load_average": [0.5, 0.25, 0.1]}]},
        {"sessions": [session]},
        {},  # a run older than its sessions
    ]
    line = trained_at(runs)
    assert line.startswith("Trained at abc1234, def5678 (2 of 3 runs; the others predate the record);")
    assert line.endswith("0.2-2.0.\n")
    assert trained_at(runs[:2]).startswith("Trained at abc1234, def5678; load")
    assert trained_at([{}]) == ""
