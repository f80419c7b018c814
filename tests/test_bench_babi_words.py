"""bench/babi_words.py: ms a word of train's bAbI model, forward and backward, for each model named."""

import json

import pytest

from bench import babi_words

TINY = ["--batch", "2", "--words", "5", "--vocabulary", "10", "--hidden-size", "8", "--embedding-size", "4"]


def test_each_model_is_timed_and_the_table_written(tmp_path):
    out = tmp_path / "words.json"
    summary = babi_words.main(
        [*TINY, "--slots", "4", "--repeats", "1", "--models", "dnc", "sam", "lstm", "--out", str(out)]
    )
    assert list(summary["results"]) == ["dnc", "sam", "lstm"]
    for times in summary["results"].values():
        assert times["forward_ms"] > 0 and times["backward_ms"] > 0
        assert times["forward_ms"] in times["forward_ms_each"] and len(times["backward_ms_each"]) == 1
    assert json.loads(out.read_text())["results"] == summary["results"]
    assert summary["header"]["config"]["k"] == 4  # SAM's K fits the 4 slots
    assert "| lstm |" in out.with_suffix(".md").read_text()


@pytest.mark.parametrize(("option", "value"), [("--words", "0"), ("--repeats", "0"), ("--dropout", "1")])
def test_sizes_out_of_range_are_refused(option, value, tmp_path, capsys):
    with pytest.raises(SystemExit):
        babi_words.main([*TINY, option, value, "--out", str(tmp_path / "words.json")])
    assert option in capsys.readouterr().err
