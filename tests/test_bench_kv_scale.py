"""bench/kv_scale.py: runs trained in their own processes, every cell of the grid evaluated once
(the sparse runs at every N, the LSTM without a memory), the table, the plots, and a second call
that reads the ended runs and the kept cells back."""

import json

import pytest

from bench import kv_scale

TINY = "--hidden-size 8 --key-bits 6 --min-level 2 --max-level 4 --batch-size 2 --steps 2 --window 1"


@pytest.mark.slow
def test_the_grid_is_trained_scored_tabled_and_read_back(tmp_path, capsys):
    args = ["--only", "sam-1024", "lstm", "--slots", "16", "64", "--pairs", "4", "40", "--answers", "4"]
    args += ["--batch-size", "2", "--minutes", "5", "--jobs", "2", "--options", TINY]
    args += ["--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results")]
    results = kv_scale.main(args)
    sam, lstm = results["runs"]["sam-1024"], results["runs"]["lstm"]
    assert sam["trained_slots"] == 1024 and set(sam["errors"]) == {"16", "64"}
    assert all(set(row) == {"4", "40"} and all(0 <= e <= 1 for e in row.values()) for row in sam["errors"].values())
    assert lstm["trained_slots"] is None and len(lstm["errors"]) == 1  # no memory: one row
    assert sam["training"]["steps"] == 2 and sam["training"]["top_level"] in (2, 3, 4)
    evaluations = sorted(path.name for path in (tmp_path / "runs" / "evaluations").iterdir())
    assert len(evaluations) == 2 * 2 + 2 and "sam-1024-N64-P40.json" in evaluations
    scored = json.loads((tmp_path / "runs" / "evaluations" / "sam-1024-N64-P40.json").read_text())
    assert scored["answers_scored"] == 4 and scored["episodes"] == 2 and scored["config"]["key_bits"] == 6
    table = (tmp_path / "results" / "kv-scale.md").read_text()
    assert "| sam-1024 | 2^10 | 2 (not reached) | 2^6 |" in table and "| lstm | none |" in table
    for plot in ("kv-scale.png", "kv-scale-curves.png"):
        assert (tmp_path / "results" / plot).read_bytes()[:4] == b"\x89PNG"

    capsys.readouterr()
    again = kv_scale.main(args)  # ended runs and kept cells: nothing trained or evaluated again
    assert capsys.readouterr().out.count("read as it is") == 2 and again["runs"] == results["runs"]


def test_smooth_is_a_trailing_mean():
    assert kv_scale.smooth([1, 3, 5, 7], window=2) == [1, 2, 4, 6]


def test_cells_put_only_the_sparse_runs_at_other_sizes():
    grid = kv_scale.cells(list(kv_scale.RUNS), [1024, 2**14, 2**20], [1000])
    sam = [("sam-1024", n, 1000) for n in (1024, 2**14, 2**20)]
    own = [("sam-1048576", None, 1000), ("sdnc-1024", 1024, 1000), ("sdnc-1024", 2**20, 1000)]
    assert grid == [*sam, *own, ("dnc-1024", None, 1000), ("lstm", None, 1000)]


@pytest.mark.parametrize(("argv", "message"), [(["--jobs", "0"], "--jobs must be"), (["--minutes", "0"], "positive")])
def test_bad_arguments_are_refused(capsys, argv, message):
    with pytest.raises(SystemExit):
        kv_scale.main(argv)
    assert message in capsys.readouterr().err
