"""bench/learning.py: seeds trained in parallel processes, failures counted as failures, the copy
runs that learned scored at longer lengths, and a second call reading the ended runs back."""

import json
import shutil

import pytest

from bench import learning

TINY = "--hidden-size 8 --slots 6 --word-size 4 --bits 3 --batch-size 4 --steps 2 --window 1"


@pytest.mark.slow
def test_seeds_are_tabled_with_failures_and_copy_scored_past_training(tmp_path, capsys):
    args = ["--models", "dnc", "--seeds", "0", "1", "--jobs", "2", "--time-budget", "5"]
    args += ["--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results")]
    # priority sort: a threshold no batch meets (bits in error < 0): both seeds fail
    failed = learning.main([*args, "--tasks", "priority-sort", "--options", f"{TINY} --threshold 0"])
    sort = failed["rows"]["dnc"]["priority-sort"]
    assert sort == sort | {"seeds": 2, "learned": 0, "median_steps": None, "min_steps": None, "max_steps": None}
    assert {run["stopped_by"] for run in failed["runs"]["dnc priority-sort"].values()} == {"steps"}
    assert "| dnc | priority-sort | 0 / 2 | - | - |" in (tmp_path / "results" / "short.md").read_text()

    # copy at its top level only, a threshold every batch meets: learned at step 1, then scored longer
    copy_args = [*args, "--tasks", "copy", "--options", f"{TINY} --threshold 1000 --min-level 5"]
    learned = learning.main(copy_args)
    copy = learned["rows"]["dnc"]["copy"]
    assert copy == copy | {"seeds": 2, "learned": 2, "median_steps": 1, "min_steps": 1, "max_steps": 1}
    errors = learned["copy_bits_error_by_length"]["dnc"]
    assert set(errors) == {"0", "1"} and list(errors["0"]) == [str(n) for n in learning.MODES["short"]["copy_levels"]]
    assert all(value >= 0 for seed in errors.values() for value in seed.values())
    table = (tmp_path / "results" / "short.md").read_text()
    assert "| dnc | copy | 2 / 2 | 1 | 1-1 |" in table
    # a call on one row keeps the rows an earlier call wrote (priority sort), runs and all
    assert "| dnc | priority-sort | 0 / 2 | - | - |" in table and learned["rows"]["dnc"]["priority-sort"] == sort
    assert learned["runs"]["dnc priority-sort"] == failed["runs"]["dnc priority-sort"]
    assert learned["config"]["rows_kept"] == ["dnc priority-sort"] and failed["config"]["rows_kept"] == []
    assert json.loads((tmp_path / "results" / "short.json").read_text())["rows"] == learned["rows"]
    assert (tmp_path / "results" / "short.png").read_bytes()[:4] == b"\x89PNG"

    capsys.readouterr()
    again = learning.main(copy_args)  # the runs ended: read back, not trained again
    assert capsys.readouterr().out.count("read as it is") == 2 and again["rows"] == learned["rows"]

    # --ended-only trains nothing: seed 2 has no run yet, so the row is the two that ended
    partial = learning.main([*copy_args, "--seeds", "0", "1", "2", "--ended-only"])
    assert partial["rows"] == learned["rows"] and not (tmp_path / "runs" / "short-dnc-copy-s2").exists()

    # the run folders gone (another machine), the results file still holds every row: a call on
    # none of them replaces nothing
    shutil.rmtree(tmp_path / "runs")
    kept = learning.main([*copy_args, "--ended-only"])
    assert kept["rows"] == learned["rows"] and kept["copy_bits_error_by_length"] == {"dnc": errors}


def test_a_models_own_task_options_apply_and_options_override_them(tmp_path):
    # short mode: the DNC's recall at hidden 128 (model_tasks), the NTM's at the default 64; --options
    # come last (its --steps 2 over priority sort's uncapped steps, --slots 6 over the default)
    tiny = TINY.replace("--hidden-size 8 ", "")
    args = ["--seeds", "0", "--tasks", "associative-recall", "priority-sort", "--options", f"{tiny} --item-length 1"]
    result = learning.main([*args, "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results")])
    for model, hidden in (("dnc", 128), ("ntm", 64)):
        summary = json.loads((tmp_path / "runs" / f"short-{model}-associative-recall-s0" / "summary.json").read_text())
        assert summary["config"]["hidden_size"] == hidden
        assert summary["config"]["interface_init"] == "new-slot" and summary["config"]["num_slots"] == 6
    assert result["config"]["model_tasks"] == {"dnc associative-recall": "--hidden-size 128"}
    assert {run["steps"] for run in result["runs"]["dnc priority-sort"].values()} == {2}
    # priority sort's threshold: a sort blind to priorities 0.01 apart, 4 items (0.23 bits per sequence)
    sort = json.loads((tmp_path / "runs" / "short-dnc-priority-sort-s0" / "summary.json").read_text())["config"]
    assert sort["threshold"] == result["config"]["priority_sort_threshold"]["bits_per_sequence"] == pytest.approx(0.23)


@pytest.mark.parametrize(("argv", "message"), [(["--jobs", "0"], "--jobs must be"), (["--time-budget", "0"], "> 0")])
def test_bad_arguments_are_refused(capsys, argv, message):
    with pytest.raises(SystemExit):
        learning.main(argv)
    assert message in capsys.readouterr().err


def test_a_sort_blind_to_close_priorities_errs_as_the_readme_says():
    # exact sort: no error; blind below 0.01 of the [-1, 1] range, 20 items, 16 out: about 6 bits
    assert learning.sort_tie_bits(20, 16, 0.0, sequences=2_000) == 0
    errors = [learning.sort_tie_bits(20, 16, resolution, sequences=20_000) for resolution in (0.003, 0.01, 0.03)]
    assert errors == sorted(errors) and 5 < errors[1] < 6.5


@pytest.mark.parametrize(("mode", "sizes"), [("short", (4, None)), ("full", (20, 16))])
def test_the_sort_size_the_threshold_comes_from_is_the_one_trained(mode, sizes):
    assert learning.sort_sizes(learning.MODES[mode]["tasks"]["priority-sort"]) == sizes
