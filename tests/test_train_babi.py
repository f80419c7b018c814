"""The training CLI on bAbI: per-task test scores from the best-validation model, best.pt with
its vocabulary, exact resume, the 1k fallback, early stopping, the LSTM baseline's padding and
the bAbI options' checks. The tests write tiny bAbI files of their own; none trains for long."""

import json
import random
import re
from pathlib import Path

import pytest
import torch

from sparsemem.tasks.babi import RESERVED, Vocabulary
from sparsemem.train import BEST, CHECKPOINT, METRICS, SUMMARY, LSTMModel, main
from tests.test_train import metrics

pytestmark = pytest.mark.usefixtures("one_thread")

PEOPLE = ("mary", "john", "daniel", "sandra")
PLACES = ("bathroom", "hallway", "office", "kitchen")
THINGS = ("football", "apple", "milk")


def task_1(stories: int, seed: int) -> str:
    """Single supporting fact: two moves, a question after each; two questions a story."""
    rng = random.Random(seed)
    lines = []
    for _ in range(stories):
        first, second = rng.sample(PEOPLE, 2)
        a, b = rng.choice(PLACES), rng.choice(PLACES)
        lines += [f"1 {first.title()} moved to the {a}.", f"2 Where is {first.title()}? \t{a}\t1"]
        lines += [f"3 {second.title()} went to the {b}.", f"4 Where is {second.title()}? \t{b}\t3"]
    return "\n".join(lines) + "\n"


def task_8(stories: int, seed: int) -> str:
    """Lists: one question a story, answered by two words."""
    rng = random.Random(seed)
    lines = []
    for _ in range(stories):
        person, (x, y) = rng.choice(PEOPLE).title(), rng.sample(THINGS, 2)
        lines += [f"1 {person} got the {x} there.", f"2 {person} took the {y} there."]
        lines += [f"3 What is {person} carrying? \t{x},{y}\t1 2"]
    return "\n".join(lines) + "\n"


TEST_QUESTIONS = {"1": 2 * 7, "8": 5}
"""Test questions per task in the files `release` writes (7 and 5 stories)."""


def release(root: Path) -> Path:
    """A release root: en/ with 20 training stories a task, en-10k/ with 30 and no task 8
    training file (as en-10k has no task 3's); the same test files in both."""
    for folder, stories, task_8_train in (("en", 20, True), ("en-10k", 30, False)):
        (root / folder).mkdir(parents=True)
        (root / folder / "qa1_single-supporting-fact_train.txt").write_text(task_1(stories, seed=1))
        (root / folder / "qa1_single-supporting-fact_test.txt").write_text(task_1(7, seed=2))
        if task_8_train:
            (root / folder / "qa8_lists-sets_train.txt").write_text(task_8(stories, seed=3))
        (root / folder / "qa8_lists-sets_test.txt").write_text(task_8(5, seed=4))
    return root


def argv(tmp_path: Path, model: str, *extra: str) -> list[str]:
    """A CLI run on both tasks of the en/ set, tiny sizes."""
    data = tmp_path / "tasks_1-20_v1-2"
    if not data.exists():
        release(data)
    options = ["--task", "babi", "--data-dir", str(data), "--babi-set", "en", "--babi-tasks", "1,8"]
    options += ["--model", model, "--batch-size", "8", "--hidden-size", "8", "--embedding-size", "6"]
    options += ["--eval-every", "2", "--log-every", "1"]
    if model != "lstm":
        options += ["--slots", "8", "--word-size", "4"] + (["--k", "2"] if model in ("sam", "sdnc") else [])
    return [*options, "--checkpoint-every", "3", "--no-progress", "--out", str(tmp_path / "run"), *extra]


@pytest.mark.parametrize("model", ["dnc", "sam", "lstm"])
def test_cli_scores_each_task_from_the_best_validation_model(tmp_path, capsys, model):
    assert main(argv(tmp_path, model, "--steps", "4")) == 0
    out = tmp_path / "run"
    assert f"{model} on bAbI en tasks 1,8: validation error" in capsys.readouterr().out
    assert {path.name for path in out.iterdir()} == {METRICS, CHECKPOINT, BEST, SUMMARY, "learning_curve.png"}

    records = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    validated = {r["step"]: r["validation_error"] for r in records if "validation_error" in r}
    assert list(validated) == [2, 4] and all(0 <= error <= 1 for error in validated.values())

    babi = json.loads((out / SUMMARY).read_text())["babi"]
    assert {task: scores["questions"] for task, scores in babi["tasks"].items()} == TEST_QUESTIONS
    errors = [scores["error"] for scores in babi["tasks"].values()]
    assert babi["mean_error"] == pytest.approx(sum(errors) / 2)
    assert babi["tasks_passed"] == sum(error < 0.05 for error in errors) and babi["fallback"] == []
    best_step = min(validated, key=lambda step: (validated[step], step))  # the first of the lowest
    assert babi["best_step"] == best_step and babi["validation_error"] == validated[best_step]

    best = torch.load(out / BEST, weights_only=True)
    vocabulary = Vocabulary.from_dict(best["vocabulary"])
    assert vocabulary.words[:3] == list(RESERVED) and {"mary", "football", "?", "."} <= set(vocabulary.words)
    assert best["model"]["embedding.weight"].shape == (len(vocabulary), 6) and best["step"] == best_step
    checkpoint = torch.load(out / CHECKPOINT, weights_only=True)
    assert checkpoint["babi"]["vocabulary"] == best["vocabulary"]
    assert babi["stories_per_second"] == pytest.approx(checkpoint["babi"]["stories"] / babi["train_seconds"])


def test_resume_continues_exactly_and_adds_up_the_time(tmp_path):
    # 18 + 18 training stories, 8 a batch: 5 batches an epoch, so the resumed run starts a new epoch
    assert main(argv(tmp_path / "straight", "lstm", "--steps", "7")) == 0
    assert main(argv(tmp_path / "resumed", "lstm", "--steps", "3")) == 0
    first = torch.load(tmp_path / "resumed" / "run" / CHECKPOINT, weights_only=True)
    assert main(["--out", str(tmp_path / "resumed" / "run"), "--resume", "--steps", "7", "--no-progress"]) == 0

    straight, resumed = (
        torch.load(tmp_path / run / "run" / CHECKPOINT, weights_only=True) for run in ("straight", "resumed")
    )
    assert resumed["step"] == straight["step"] == 7
    for name, value in straight["model"].items():
        assert torch.equal(resumed["model"][name], value), name
    assert resumed["babi"]["epoch"] == straight["babi"]["epoch"] and resumed["babi"]["stories"] == 7 * 8 - 4
    assert resumed["train_seconds"] > first["train_seconds"]
    # The interrupted run scored validation at its last step (3), the straight one did not.
    assert [r for r in metrics(tmp_path / "resumed" / "run") if r["step"] != 3] == [
        r for r in metrics(tmp_path / "straight" / "run") if r["step"] != 3
    ]


def test_a_missing_training_file_is_an_error_unless_the_1k_fallback_is_asked(tmp_path, capsys):
    on_10k = [*argv(tmp_path, "lstm", "--steps", "1"), "--babi-set", "en-10k"]
    assert main(on_10k) == 2
    # named as the command line asks for the fallback, not as load_babi's argument
    error = capsys.readouterr().err
    missing_8 = r"error: no training file for task 8 \(qa8_\*_train\.txt\) in .*en-10k; --babi-fallback-1k reads"
    assert re.search(missing_8, error)
    assert "fallback_1k=True" not in error

    assert main([*on_10k, "--babi-fallback-1k"]) == 0
    assert "warning: en-10k has no training file for task 8" in capsys.readouterr().err
    summary = json.loads((tmp_path / "run" / SUMMARY).read_text())
    assert summary["babi"]["fallback"] == ["8"]
    assert {task: scores["questions"] for task, scores in summary["babi"]["tasks"].items()} == TEST_QUESTIONS


def test_patience_stops_after_scores_without_a_better_one(tmp_path):
    # With lr 0 the validation error never improves after the first score.
    assert main(argv(tmp_path, "lstm", "--steps", "20", "--eval-every", "1", "--patience", "2", "--lr", "0")) == 0
    summary = json.loads((tmp_path / "run" / SUMMARY).read_text())
    assert summary["steps"] == 3 and summary["stopped_by"] == "patience" and summary["babi"]["best_step"] == 1


@pytest.mark.parametrize("lengths", [[6, 2, 4], [3, 3, 3], [1, 6, 1]])
@pytest.mark.parametrize("with_state", [False, True])
def test_the_lstm_baseline_runs_a_padded_batch_as_each_row_alone(lengths, with_state):
    torch.manual_seed(0)
    model = LSTMModel(3, 5, 4).double()
    x = torch.randn(3, 6, 3, dtype=torch.float64, requires_grad=True)
    state = tuple(torch.randn(1, 3, 5, dtype=torch.float64) for _ in range(2)) if with_state else None
    lengths = torch.tensor(lengths)
    y, (h, c) = model(x, state, lengths=lengths)
    (y.sum() + h.sum() + c.sum()).backward()
    for b, length in enumerate(lengths.tolist()):
        x_b = x[b : b + 1, :length].detach().requires_grad_()
        alone, (h_b, c_b) = model(x_b, None if state is None else tuple(s[:, b : b + 1] for s in state))
        (alone.sum() + h_b.sum() + c_b.sum()).backward()
        torch.testing.assert_close(y[b, :length], alone[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(h[:, b], h_b[:, 0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(c[:, b], c_b[:, 0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(x.grad[b, :length], x_b.grad[0], rtol=1e-10, atol=1e-10)
        assert torch.all(y[b, length:] == 0) and torch.all(x.grad[b, length:] == 0)


@pytest.mark.parametrize(
    "options, message",
    [
        (["--task", "babi"], "--task babi needs --data-dir DIR"),
        (["--task", "babi", "--data-dir", "{tmp}/nowhere"], "--data-dir .*/nowhere: no such file or directory"),
        (["--task", "babi", "--data-dir", "{tmp}", "--babi-tasks", "0"], "--babi-tasks must be all or distinct"),
        (["--task", "babi", "--data-dir", "{tmp}", "--babi-tasks", "1,x"], "--babi-tasks must be all or distinct"),
        (["--task", "babi", "--data-dir", "{tmp}", "--babi-tasks", "2,2"], "--babi-tasks must be all or distinct"),
        (["--task", "babi", "--data-dir", "{tmp}", "--bptt", "4"], "--bptt is not for --task babi"),
        (["--task", "babi", "--data-dir", "{tmp}", "--eval-every", "0"], "--eval-every must be a positive integer"),
        (["--task", "babi", "--data-dir", "{tmp}", "--patience", "0"], "--patience must be a positive integer"),
        (["--babi-set", "stories"], "argument --babi-set: invalid choice: 'stories'"),
        (["--data-dir", "{tmp}"], "--data-dir is for --task babi; got it with --task copy"),
        (["--babi-fallback-1k"], "--babi-fallback-1k is for --task babi; got it with --task copy"),
        (["--embedding-size", "8"], "--embedding-size is for --task babi; got it"),
    ],
)
def test_cli_refuses_bad_babi_options_before_reading_anything(tmp_path, capsys, options, message):
    options = [option.format(tmp=tmp_path) for option in options]
    with pytest.raises(SystemExit) as exit:
        main([*options, "--out", str(tmp_path / "run"), "--no-progress"])
    assert exit.value.code == 2
    assert re.search(f"error: .*{message}", capsys.readouterr().err)
