"""python -m sparsemem.evaluate: a run trained by the CLI scored again, as train scores it, at other
memory sizes, in chunks; its JSON and its refusals."""

import json

import pytest
import torch
from torch import nn

from sparsemem import evaluate, train
from sparsemem.models import DNC

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--steps", "4", "--batch-size", "4", "--hidden-size", "16", "--no-progress"]
KV_TASK = ["--task", "key-value-recall", "--max-level", "8", "--bptt", "16", "--final-queries", "4", *TINY]
KV_RUN = ["--model", "sam", "--slots", "32", "--k", "4", "--word-size", "8", *KV_TASK]
LSTM_KV_RUN = ["--model", "lstm", *KV_TASK]  # the baseline on the same task
COPY_RUN = ["--model", "dnc", "--task", "copy", "--slots", "8", "--word-size", "8", "--bits", "4", "--max-level", "4"]
COPY_RUN += TINY


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A SAM and an LSTM trained on key-value-recall and a DNC trained on copy, a few steps each, by the CLI."""
    root = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    for name, argv in (("sam-kv", KV_RUN), ("lstm-kv", LSTM_KV_RUN), ("dnc-copy", COPY_RUN)):
        assert train.main([*argv, "--out", str(root / name)]) == 0
    torch.set_num_threads(threads)
    return root


def run_cli(capsys, run, *argv) -> dict:
    """Evaluate `run` with the CLI -> the JSON it printed, checked equal to the file it wrote."""
    out = run.parent / f"{run.name}-{len(list(run.parent.iterdir()))}.json"
    assert evaluate.main([str(run), "--quiet", "--out", str(out), *argv]) == 0
    printed = capsys.readouterr()
    result = json.loads(printed.out)
    assert json.loads(out.read_text()) == result
    assert f"wrote {out}" in printed.err
    return result


@pytest.mark.parametrize("run", ["sam-kv", "lstm-kv"])
def test_error_is_trains_final_query_error_at_the_same_level_and_seed(runs, capsys, run):
    summary = json.loads((runs / run / train.SUMMARY).read_text())
    for level in (2, 8):  # train scores each level on its own held-out batch (seed 1234, 32 episodes)
        result = run_cli(capsys, runs / run, "--level", str(level))
        assert result["error"] == summary["final_query_error"][str(level)]
        assert result["answers_scored"] == 32 * 4 and result["bits_scored"] == 32 * 4 * 8
    # the bits error of train's first held-out level (its batches are drawn in turn from one generator)
    result = run_cli(capsys, runs / run, "--level", "2")
    assert result["bits_error_per_sequence"] == pytest.approx(summary["eval_bits_error"]["2"], rel=1e-6)


def test_error_of_copy_counts_every_answer_bit_as_train_does(runs, capsys):
    summary = json.loads((runs / "dnc-copy" / train.SUMMARY).read_text())
    result = run_cli(capsys, runs / "dnc-copy", "--level", "1")  # copy's first level
    assert result["bits_error_per_sequence"] == pytest.approx(summary["eval_bits_error"]["1"], rel=1e-6)
    assert result["answers_scored"] == 32 and result["error"] == pytest.approx(result["bits_error_per_sequence"] / 4)


def test_the_json_reports_the_error_its_cost_and_the_config(runs, capsys):
    result = run_cli(capsys, runs / "sam-kv", "--episodes", "3", "--batch-size", "2", "--seed", "5")
    expected = {"error", "bits_error_per_sequence", "answers_scored", "ms_per_step", "peak_memory_mb", "config"}
    assert expected <= set(result)
    assert 0 <= result["error"] <= 1 and result["ms_per_step"] > 0 and result["peak_memory_mb"] > 1
    T = 8 + 8 // 4 + 4  # the top level by default: stores, recent queries, final queries
    assert result["level"] == 8 and result["episodes"] == 3 and result["time_steps"] == 2 * T
    assert result["answers_scored"] == 3 * 4 and result["bits_scored"] == 3 * 4 * 8
    assert result["config"]["model"] == "sam" and result["config"]["num_slots"] == 32
    assert result["evaluation"] == {"batch_size": 2, "seed": 5, "chunk": 1024, "threads": 1, "device": "cpu"}
    assert result["checkpoint_step"] == 4 and result["run_dir"] == str(runs / "sam-kv")


def test_answers_asks_for_enough_episodes(runs, capsys):
    assert run_cli(capsys, runs / "sam-kv", "--answers", "9")["episodes"] == 3  # 4 final queries each
    assert run_cli(capsys, runs / "dnc-copy", "--answers", "9", "--level", "4")["episodes"] == 3  # 4 answers each


@pytest.mark.parametrize(
    ("run", "argv"), [("sam-kv", ["--level", "8"]), ("lstm-kv", ["--level", "8"]), ("dnc-copy", ["--level", "4"])]
)
def test_chunked_evaluation_gives_the_error_of_one_forward(runs, capsys, run, argv):
    whole = run_cli(capsys, runs / run, *argv, "--episodes", "4")
    chunked = run_cli(capsys, runs / run, *argv, "--episodes", "4", "--chunk", "3")
    for key in ("error", "bits_error_per_sequence", "answers_scored", "time_steps"):
        assert chunked[key] == whole[key], key


def test_sam_evaluated_with_more_slots_and_longer_episodes(runs, capsys):
    result = run_cli(capsys, runs / "sam-kv", "--slots", "4096", "--level", "200", "--episodes", "2", "--chunk", "64")
    assert result["slots"] == 4096 and result["trained_slots"] == 32 and result["config"]["num_slots"] == 4096
    assert result["level"] == 200 and result["time_steps"] == 200 + 50 + 4
    assert 0 <= result["error"] <= 1 and result["answers_scored"] == 8


def test_dense_models_take_another_memory_size_too(runs, capsys):
    # NTM's and DNC's parameters do not depend on N either: the interface is sized by W and R
    result = run_cli(capsys, runs / "dnc-copy", "--slots", "20", "--level", "6")
    assert result["slots"] == 20 and 0 <= result["error"] <= 1


class LearnedInitialMemory(DNC):
    """A DNC with a parameter [N, W] (a learned initial memory): its parameters depend on N."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.initial_memory = nn.Parameter(torch.zeros(self.memory.num_slots, self.memory.word_size))


def test_a_model_whose_parameters_depend_on_the_slots_refuses_another_size(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(train.MODELS, "dnc", LearnedInitialMemory)
    assert train.main([*COPY_RUN, "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert evaluate.main([str(tmp_path / "run"), "--slots", "12", "--quiet", "--out", str(tmp_path / "e.json")]) == 2
    err = capsys.readouterr().err
    assert "the dnc's parameters depend on N" in err and "initial_memory [8, 8] -> [12, 8]" in err
    assert "--slots 8" in err and not (tmp_path / "e.json").exists()
    # at its own size it evaluates
    assert evaluate.main([str(tmp_path / "run"), "--quiet", "--out", str(tmp_path / "e.json")]) == 0


@pytest.mark.parametrize(
    ("run", "argv", "message"),
    [
        ("sam-kv", ["--slots", "3"], "--slots 3: the sam cannot be built: k must be in [1, N=3]; got k=4"),
        ("sam-kv", ["--level", "0"], "--level 0 is not a level of key-value-recall"),
        ("dnc-copy", ["--level", "-2"], "--level -2 is not a level of copy"),
        ("sam-kv", ["--device", "tpu"], "--device must be cpu, cuda or cuda:INDEX; got 'tpu'"),
        ("dnc-copy", ["--index", "faiss-hnsw"], "--index: a dnc has no index (only sam and sdnc have one)"),
        ("dnc-copy", ["--task", "priority-sort"], "the dnc's parameters depend on the task's input or output size"),
        ("lstm-kv", ["--slots", "64"], "--slots: a lstm has no memory (only dnc, ntm, sam, sdnc have one)"),
        ("lstm-kv", ["--index", "exact"], "--index: a lstm has no index"),
        ("dnc-copy", ["--final-queries", "3"], "--final-queries is for --task key-value-recall only"),
        ("sam-kv", ["--final-queries", "0"], "--final-queries must be a positive integer"),
        ("sam-kv", ["--episodes", "0"], "--episodes must be a positive integer; got 0"),
        ("sam-kv", ["--chunk", "0"], "--chunk must be a positive integer; got 0"),
    ],
)
def test_bad_options_are_refused_naming_them(runs, capsys, run, argv, message):
    assert evaluate.main([str(runs / run), "--quiet", "--out", str(runs / "refused.json"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (runs / "refused.json").exists()


def test_a_missing_run_or_checkpoint_and_a_damaged_checkpoint_are_named(tmp_path, capsys):
    assert evaluate.main([str(tmp_path / "nowhere")]) == 2
    assert f"no run directory {tmp_path / 'nowhere'}" in capsys.readouterr().err
    assert evaluate.main([str(tmp_path)]) == 2
    assert f"no checkpoint at {tmp_path / train.CHECKPOINT}" in capsys.readouterr().err
    (tmp_path / train.CHECKPOINT).write_bytes(b"not a checkpoint")
    assert evaluate.main([str(tmp_path)]) == 2
    assert f"{tmp_path / train.CHECKPOINT} cannot be read as a checkpoint" in capsys.readouterr().err


def test_episodes_and_answers_together_are_a_usage_error(runs, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([str(runs / "sam-kv"), "--episodes", "2", "--answers", "8"])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
