"""bench/babi.py: both models of a table row trained side by side on tiny bAbI files, their test
scores tabled beside the published columns, and a second call reading the spent runs back."""

import json

import pytest

from bench import babi
from tests.test_train_babi import TEST_QUESTIONS, release


@pytest.mark.slow
def test_bench_babi_tables_both_models_and_reuses_spent_runs(tmp_path, capsys):
    data = release(tmp_path / "tasks_1-20_v1-2")
    tiny = "--hidden-size 8 --embedding-size 6 --batch-size 8 --eval-every 2 --steps 3"
    args = ["--data-dir", str(data), "--per-task", "1,8", "--minutes", "5", "--common", tiny]
    args += ["--memory-options", "--slots 8 --word-size 4", "--runs", str(tmp_path / "runs")]
    args += ["--results", str(tmp_path / "results"), "--name", "t"]
    result = babi.main(args)

    assert set(result["runs"]) == {"1", "8"} and result["config"]["minutes_per_run"] == 5
    # the call's options are in the results, beside each run's own commands
    options = {key: result["config"][key] for key in ("common", "memory_options", "lstm_options")}
    assert options == {"common": tiny, "memory_options": "--slots 8 --word-size 4", "lstm_options": ""}
    for task, pair in result["runs"].items():
        assert set(pair) == {"dnc", "lstm"}
        for model, run in pair.items():
            assert run["config"]["model"] == model and run["steps"] == 3
            assert run["tasks"][task]["questions"] == TEST_QUESTIONS[task]
            [command] = run["commands"]
            assert f"--babi-tasks {task} --model {model}" in command and "--threads 1" in command
    assert result["runs"]["8"]["dnc"]["fallback"] == ["8"]  # en-10k has no task 8 training file
    table = (tmp_path / "results" / "t.md").read_text()
    assert table.splitlines()[0].startswith("| task | ours: dnc | ours: LSTM | LSTM (published)")
    assert "| 1 | " in table and "| 8* | " in table and "1k training file" in table
    assert "| 1 | " in table.split("\n", 2)[2] and " 24.5 | 0.0 | 0.0 |" in table  # task 1's published
    assert json.loads((tmp_path / "results" / "t.json").read_text())["runs"] == json.loads(json.dumps(result["runs"]))
    assert (tmp_path / "results" / "t.png").stat().st_size > 0

    capsys.readouterr()
    again = babi.main(args)  # the runs have summaries with a 5-minute budget: read, not retrained
    assert "read as it is" in capsys.readouterr().out and again["runs"] == result["runs"]


def test_a_joint_table_stars_only_the_tasks_trained_on_the_1k_fallback():
    def run(errors):
        tasks = {task: {"error": error, "questions": 1000} for task, error in errors.items()}
        return {"tasks": tasks, "mean_error": sum(errors.values()) / 2, "tasks_passed": 1, "fallback": ["3"]}

    table = babi.table([(run({"1": 0.02, "3": 0.5}), run({"1": 0.3, "3": 0.6}))], "dnc")
    assert "| 1 | 2.0 | 30.0 | 24.5 | 0.0 | 0.0 |" in table and "| 3* | 50.0 | 60.0 | 48.3 |" in table
    assert "| mean | 26.0 | 45.0 | 25.2 | 7.5 | 3.8 |" in table
