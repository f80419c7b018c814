"""The training CLI: exact resume, divergence handling, option checks, time budget, its files."""

import dataclasses
import io
import json
import math
import re

import pytest
import torch

from sparsemem import train
from sparsemem._provenance import source_commit
from sparsemem.memory import SAMMemory
from sparsemem.train import CHECKPOINT, METRICS, SUMMARY, Config, Trainer, TrainingDiverged, main

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(tmp_path, **kwargs) -> Config:
    options = dict(
        task="copy",
        steps=6,
        batch_size=4,
        hidden_size=8,
        num_slots=5,
        word_size=4,
        bits=4,
        max_level=3,
        window=2,
        threshold=10.0,  # the curriculum moves within a few steps
        stop_at_threshold=False,
        checkpoint_every=3,
        log_every=1,
        out=str(tmp_path),
    )
    return Config(**(options | kwargs))


TINY_ARGV = ["--steps", "3", "--batch-size", "2", "--hidden-size", "8"]
TINY_ARGV += ["--bits", "3", "--max-level", "2", "--checkpoint-every", "3", "--log-every", "1", "--no-progress"]
"""A CLI run of a few milliseconds a step."""


@pytest.mark.parametrize("model", ["dnc", "ntm", "lstm"])
def test_resume_continues_bit_exactly(tmp_path, capsys, model):
    straight = Trainer(tiny(tmp_path / "straight", model=model))
    straight.run(progress=False)

    interrupted = Trainer(tiny(tmp_path / "resumed", model=model, steps=3))
    interrupted.run(progress=False)
    # An interrupted run may have logged past its checkpoint, the last line cut short by a power
    # loss; resume drops those lines.
    with open(tmp_path / "resumed" / METRICS, "a") as log:
        log.write(json.dumps({"step": 4, "loss": 0.0}) + '\n{"step": 5, "lo')
    resumed = Trainer(tiny(tmp_path / "resumed", model=model))
    resumed.run(progress=False, resume=True)

    assert "dropped its last line, cut short" in capsys.readouterr().err
    assert resumed.step == straight.step == 6
    assert resumed.curriculum.state_dict() == straight.curriculum.state_dict()
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(straight.generator.get_state(), resumed.generator.get_state())
    assert metrics(tmp_path / "resumed") == metrics(tmp_path / "straight")


def test_the_learning_rate_halves_every_half_life_and_a_resume_keeps_the_schedule(tmp_path):
    straight = Trainer(tiny(tmp_path / "straight", lr_half_life=2.0))
    straight.run(progress=False)
    # the sixth update is made at step 5: lr 0.5^(5 / 2)
    assert straight.optimizer.param_groups[0]["lr"] == pytest.approx(straight.config.lr * 0.5**2.5)
    Trainer(tiny(tmp_path / "resumed", lr_half_life=2.0, steps=3)).run(progress=False)
    resumed = Trainer(tiny(tmp_path / "resumed", lr_half_life=2.0))
    resumed.run(progress=False, resume=True)
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    constant = Trainer(tiny(tmp_path / "constant"))
    constant.run(progress=False)
    assert not torch.equal(constant.model.interface.weight, straight.model.interface.weight)


def metrics(out, timed=("step_seconds", "sequences_per_second", "peak_memory_mb")) -> list[dict]:
    """The logged records without the fields that measure the machine (they differ run to run)."""
    records = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
    return [{key: value for key, value in record.items() if key not in timed} for record in records]


def test_a_bad_line_before_the_last_is_an_error_naming_it(tmp_path):
    Trainer(tiny(tmp_path, steps=1)).run(progress=False)
    (tmp_path / METRICS).write_text('{"step": 1}\n{"st\n{"step": 1}\n')
    with pytest.raises(ValueError, match=f"{METRICS}: line 2 is not JSON"):
        Trainer(tiny(tmp_path, steps=2)).run(progress=False, resume=True)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer = Trainer(tiny(tmp_path, steps=10))
    for _ in range(3):
        trainer.train_step()
    trainer.save()
    good = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    with torch.no_grad():
        trainer.model.output.bias.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 4: .*checkpoint .* \(step 3\) is kept"):
        trainer.run(progress=False)
    kept = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert kept["step"] == 3
    assert torch.equal(kept["model"]["output.bias"], good["model"]["output.bias"])
    assert not list(tmp_path.glob(".*"))  # no temporary of an atomic write left behind


@pytest.mark.parametrize("option", [{"lr": math.inf}, {"clip": math.nan}])
def test_an_update_that_breaks_the_parameters_stops_before_any_checkpoint(tmp_path, option):
    # The loss and the gradient norm of step 1 are finite; the parameters after it are not.
    trainer = Trainer(tiny(tmp_path, checkpoint_every=1, **option))
    with pytest.raises(
        TrainingDiverged, match=r"a parameter is NaN or inf after the update at step 1: .*no checkpoint"
    ):
        trainer.run(progress=False)
    assert not (tmp_path / CHECKPOINT).exists()


def test_a_broken_optimizer_state_stops_training(tmp_path):
    trainer = Trainer(tiny(tmp_path))
    trainer.train_step()
    trainer.save()
    for state in trainer.optimizer.state.values():
        state["exp_avg_sq"].fill_(math.inf)  # Adam's update is then 0: the parameters stay finite
    with pytest.raises(
        TrainingDiverged, match=r"optimizer state holds NaN or inf after the update at step 2: .*\(step 1\)"
    ):
        trainer.run(progress=False)
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["step"] == 1


def test_cli_divergence_exits_1_and_writes_no_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, "sequence_loss", lambda logits, batch: logits.sum() * math.nan)
    assert main([*TINY_ARGV, "--checkpoint-every", "1", "--out", str(tmp_path)]) == 1
    assert capsys.readouterr().err == "error: loss is nan at step 1: training stopped; no checkpoint was written yet\n"
    assert not (tmp_path / CHECKPOINT).exists()


@pytest.mark.parametrize(
    ("argv", "steps"),
    [
        (["--task", "priority-sort", "--sort-outputs", "2"], 4 + 1 + 2),
        (["--task", "repeat-copy", "--max-repeats", "1"], 4 + 1 + 4 + 1),
    ],
)
def test_cli_task_options_reach_the_task(tmp_path, argv, steps):
    trainer = Trainer(train.parse_args([*argv, "--min-level", "4", "--max-level", "4", "--out", str(tmp_path)])[0])
    assert trainer.task.sample(2, 4, torch.Generator().manual_seed(0)).inputs.shape[1] == steps


def test_cli_lets_a_switch_turned_off_through_for_a_model_that_does_not_read_it(tmp_path):
    # bench.learning's --full options hold --compile; a sparse run's own --no-compile then overrides it
    config = train.parse_args(["--model", "sam", "--compile", "--no-compile", "--out", str(tmp_path)])[0]
    assert config.model == "sam" and config.compile is False
    config = train.parse_args(["--task", "copy", "--no-babi-fallback-1k", "--out", str(tmp_path)])[0]
    assert config.babi_fallback_1k is False


def test_cli_repeats_follow_the_level_when_asked(tmp_path):
    argv = ["--task", "repeat-copy", "--max-repeats", "9", "--max-level", "4", "--out", str(tmp_path)]
    for flag, follows in (([], False), (["--repeats-follow-level"], True)):
        task = Trainer(train.parse_args([*argv, *flag])[0]).task
        assert (task.max_repeats, task.repeats_follow_level) == (9, follows)


def test_cli_writes_metrics_checkpoint_and_plots(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--model", "dnc", "--task", "associative-recall", "--steps", "4", "--batch-size", "2"]
    argv += ["--hidden-size", "8", "--num-slots", "6", "--word-size", "4", "--bits", "3", "--max-level", "3"]
    argv += ["--item-length", "2", "--controller", "feedforward"]
    argv += ["--log-every", "2", "--checkpoint-every", "2", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    assert "dnc on associative-recall" in capsys.readouterr().out
    names = {path.name for path in out.iterdir()}
    assert names == {METRICS, CHECKPOINT, SUMMARY, "learning_curve.png", "memory_access.png"}
    records = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert all(r["sequences_per_second"] == pytest.approx(2 / r["step_seconds"]) for r in records)
    summary = json.loads((out / SUMMARY).read_text())
    assert summary["steps"] == 4 and set(summary["eval_bits_error"]) == {"2", "3"}
    assert summary["stopped_by"] == "steps" and summary["config"]["time_budget"] is None
    assert summary["sequences_per_second"] == pytest.approx(4 * 2 / summary["train_seconds"])
    assert sum(r["step_seconds"] for r in records) < summary["train_seconds"] < summary["seconds"]
    for plot in ("learning_curve.png", "memory_access.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_lstm_baseline_trains_on_an_algorithmic_task_without_a_memory_plot(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--model", "lstm", "--task", "copy", *TINY_ARGV, "--bptt", "2", "--out", str(out)]) == 0
    assert "lstm on copy" in capsys.readouterr().out
    assert {path.name for path in out.iterdir()} == {METRICS, CHECKPOINT, SUMMARY, "learning_curve.png"}
    summary = json.loads((out / SUMMARY).read_text())
    assert summary["steps"] == 3 and set(summary["eval_bits_error"]) == {"1", "2"}


@pytest.mark.parametrize("model", ["dnc", "lstm"])
def test_dropout_trains_and_held_out_scores_run_without_it(tmp_path, model):
    config = tiny(tmp_path, model=model, dropout=0.5, steps=2)
    task = train.make_task(config)
    dropped = train.make_model(config, task)
    plain = train.make_model(dataclasses.replace(config, dropout=0.0), task)
    plain.load_state_dict(dropped.state_dict())
    x = task.sample(4, 2, torch.Generator().manual_seed(0)).inputs
    assert not torch.allclose(dropped(x)[0], plain(x)[0])  # training mode drops
    assert train.evaluate(dropped, task) == train.evaluate(plain, task)
    assert dropped.training  # the mode is restored
    assert Trainer(config).run(progress=False)["steps"] == 2


@pytest.mark.parametrize("model", ["sam", "sdnc"])
def test_cli_trains_the_sparse_models_and_reports_time_and_memory(tmp_path, capsys, model):
    out = tmp_path / model
    argv = ["--model", model, "--task", "copy", "--steps", "3", "--batch-size", "2", "--hidden-size", "8"]
    argv += ["--slots", "64", "--word-size", "4", "--num-reads", "2", "--k", "3", "--index", "exact"]
    argv += ["--bits", "3", "--max-level", "2", "--device", "cpu", "--log-every", "1"]
    argv += ["--link-k", "2"] if model == "sdnc" else []
    argv += ["--out", str(out), "--no-progress"]
    assert main(argv) == 0
    assert f"{model} on copy" in capsys.readouterr().out
    summary = json.loads((out / SUMMARY).read_text())
    assert summary["config"]["num_slots"] == 64 and summary["config"]["k"] == 3
    records = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["step_seconds"] > 0 and r["peak_memory_mb"] > 1 for r in records)
    state = torch.load(out / CHECKPOINT, weights_only=True)["model"]
    assert state["interface.weight"].shape[0] == {"sam": 2 * 4 + 2 + 4 + 2, "sdnc": 2 * 4 + 2 + 4 + 2 + 3 * 2}[model]


@pytest.mark.parametrize("model_name", ["dnc", "ntm"])
@pytest.mark.parametrize("interface_init", ["linear", "new-slot"])
def test_interface_init_sets_the_interface_bias(model_name, interface_init):
    config = Config(model=model_name, interface_init=interface_init, num_reads=2)
    torch.manual_seed(0)
    model = train.make_model(config, train.make_task(config))
    torch.manual_seed(0)
    expected = train.make_model(Config(model=model_name, num_reads=2), train.make_task(config))
    if interface_init == "new-slot":
        expected.memory.init_interface_bias(expected.interface.bias)
    assert torch.equal(model.interface.bias, expected.interface.bias)


@pytest.mark.parametrize("sequence_max_slots", [None, 2**13])
def test_sam_trains_alike_with_a_memory_of_any_size_that_holds_its_episodes(tmp_path, monkeypatch, sequence_max_slots):
    # bench/results/learning/kv-scale: N = 2^20 followed N = 2^10 bit for bit (the LRU picks the same
    # slots, the index finds the same rows); here N = 64 against N = 2^13, past the blocked LRU's 2^12,
    # both in the step loop and both as one op (sam_sequence, which scans only the written rows)
    monkeypatch.setattr(SAMMemory, "sequence_max_slots", sequence_max_slots)
    weights = []
    for num_slots in (64, 2**13):
        config = tiny(tmp_path / str(num_slots), model="sam", task="key-value-recall", min_level=6, max_level=6)
        config = dataclasses.replace(config, key_bits=6, final_queries=3, num_slots=num_slots, k=4, steps=3)
        trainer = Trainer(config)
        trainer.run(progress=False)
        weights.append(trainer.model.state_dict())
    for name, value in weights[0].items():
        assert torch.equal(value, weights[1][name]), name


def test_truncated_bptt_updates_once_per_window_and_scores_the_final_queries(tmp_path):
    # 8 pairs, a query after every 2 stores, 3 final queries: T = 8 + 4 + 3 = 15 steps, queries
    # at steps 2, 5, 8, 11, 12, 13, 14, so each window of 4 steps holds one: 4 updates a batch
    config = tiny(tmp_path, model="sam", task="key-value-recall", min_level=8, max_level=8, bptt=4, steps=2)
    config = dataclasses.replace(config, key_bits=6, query_every=2, recent=4, final_queries=3, num_slots=32)
    trainer = Trainer(config)
    summary = trainer.run(progress=False)
    assert [state["step"] for state in trainer.optimizer.state.values()] == [8] * len(trainer.optimizer.state)
    assert set(summary["final_query_error"]) == {8} and 0 <= summary["final_query_error"][8] <= 1


def test_resume_takes_the_checkpoints_options_and_the_given_learning_rate(tmp_path):
    assert main([*TINY_ARGV, "--model", "ntm", "--lr", "1e-2", "--out", str(tmp_path)]) == 0
    before = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    # --model ntm again is no change; --lr 0 must reach the optimizer, so the parameters stay
    assert main(["--out", str(tmp_path), "--resume", "--steps", "5", "--lr", "0", "--model", "ntm"]) == 0
    after = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert after["step"] == 5
    assert after["config"] == before["config"] | {"steps": 5, "lr": 0.0}
    assert [group["lr"] for group in after["optimizer"]["param_groups"]] == [0.0]
    for name, value in before["model"].items():
        assert torch.equal(after["model"][name], value), name


@pytest.mark.parametrize(
    "change",
    [
        ["--model", "dnc"],
        ["--slots", "7"],
        ["--seed", "1"],
        ["--no-curriculum"],
        ["--max-level", "2"],
        ["--batch-size", "3"],
        ["--controller", "feedforward"],
        ["--bptt", "2"],
        ["--threshold", "0.5"],
    ],
)
def test_resume_refuses_to_change_the_model_the_task_or_the_data(tmp_path, capsys, change):
    Trainer(tiny(tmp_path, model="ntm")).save()
    with pytest.raises(SystemExit) as exit:
        main(["--out", str(tmp_path), "--resume", "--steps", "5", *change])
    assert exit.value.code == 2
    flag = "--num-slots" if change[0] == "--slots" else change[0].replace("--no-", "--")
    assert f"error: --resume: {flag} is " in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--clip", "-1"], "--clip must be a number > 0"),
        (["--clip", "0"], "--clip must be a number > 0"),
        (["--clip", "nan"], "--clip must be a number > 0"),
        (["--lr", "inf"], r"--lr must be a number in \[0, 3.4e\+37\]; got inf"),
        (["--lr", "1e39"], r"--lr must be a number in \[0, 3.4e\+37\]"),
        (["--lr", "-1"], r"--lr must be a number in \[0, 3.4e\+37\]"),
        (["--steps", "-5"], "--steps must be a positive integer; got -5"),
        (["--steps", "1.5"], "argument --steps: invalid int value: '1.5'"),
        (["--window", "0"], "--window must be a positive integer"),
        (["--curriculum-growth", "0.5"], "--curriculum-growth must be a number >= 1"),
        (["--curriculum-top-share", "2"], r"--curriculum-top-share must be a number in \[0, 1\]; got 2"),
        (["--checkpoint-every", "0"], "--checkpoint-every must be a positive integer"),
        (["--log-every", "0"], "--log-every must be a positive integer"),
        (["--threads", "0"], "--threads must be a positive integer"),
        (["--time-budget", "0"], "--time-budget must be a number of minutes > 0"),
        (["--bits", "0"], "--bits must be a positive integer"),
        (["--max-repeats", "0"], "--max-repeats must be a positive integer"),
        (["--sort-outputs", "0"], "--sort-outputs must be a positive integer"),
        (["--model", "gru"], "argument --model: invalid choice: 'gru'"),
        (["--task", "sorting"], "argument --task: invalid choice: 'sorting'"),
        (["--controller", "gru"], "argument --controller: invalid choice: 'gru'"),
        (["--index", "lsh"], "argument --index: invalid choice: 'lsh'"),
        (["--interface-init", "zero"], "argument --interface-init: invalid choice: 'zero'"),
        (
            ["--model", "sam", "--interface-init", "new-slot"],
            "--interface-init new-slot is for --model dnc or ntm.*sam",
        ),
        (
            ["--model", "lstm", "--interface-init", "new-slot"],
            "--interface-init new-slot is for --model dnc or ntm; got",
        ),
        (["--model", "dnc", "--k", "2"], "--k is for --model sam or sdnc; got it with --model dnc"),
        (["--model", "sam", "--link-k", "8"], "--link-k is for --model sdnc; got it with --model sam"),
        (
            ["--model", "lstm", "--slots", "8"],
            "--num-slots is for --model dnc or ntm or sam or sdnc; got it with --model lstm",
        ),
        (["--model", "lstm", "--controller", "lstm"], "--controller is for --model dnc or ntm or sam or sdnc"),
        (["--model", "sam", "--compile"], "--compile is for --model dnc or ntm; got it with --model sam"),
        (["--model", "dnc", "--num-writes", "2"], "--num-writes is for --model ntm; got it with --model dnc"),
        (["--model", "ntm", "--num-writes", "0"], "--num-writes must be a positive integer; got 0"),
        (["--lr-half-life", "0"], "--lr-half-life must be a number of steps > 0; got 0"),
        (["--dropout", "1"], r"--dropout must be a probability in \[0, 1\); got 1"),
        (["--device", "tpu"], "--device must be cpu, cuda or cuda:INDEX; got 'tpu'"),
        (["--device", "cuda:x"], "--device must be cpu, cuda or cuda:INDEX; got 'cuda:x'"),
        (["--device", "cuda:99"], "--device cuda:99: "),
        pytest.param(
            ["--device", "cuda"],
            "--device cuda: this torch .* sees no CUDA device",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is there"),
        ),
        (["--hidden-size", "0"], "hidden_size must be a positive int; got 0"),
        (["--model", "sam", "--slots", "5", "--k", "6"], r"k must be in \[1, N=5\]; got k=6"),
        (["--min-level", "2", "--max-level", "1"], "min_level <= max_level; got 2, 1"),
        (["--out", "{file}/run"], "--out .*/file/run: cannot write there"),
        (["--out", "{tmp}/empty", "--resume"], "no checkpoint at .*/empty/checkpoint.pt"),
    ],
)
def test_cli_refuses_bad_options_before_training(tmp_path, capsys, argv, message):
    (tmp_path / "file").write_text("")
    argv = [arg.format(file=tmp_path / "file", tmp=tmp_path) for arg in argv]
    with pytest.raises(SystemExit) as exit:
        main([*TINY_ARGV, "--out", str(tmp_path / "run"), *argv])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m sparsemem.train")
    assert re.search(f"error: .*{message}", err), err
    assert not (tmp_path / "run" / CHECKPOINT).exists()


def _write(path, content) -> None:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda good: b"", "cannot be read as a checkpoint"),
        (lambda good: good[: len(good) // 2], "cannot be read as a checkpoint"),
        (lambda good: b"not a checkpoint\n", "cannot be read as a checkpoint"),
        (lambda good: torch.zeros(3), "is not a checkpoint of sparsemem.train: it holds a Tensor"),
        (lambda good: {"config": {}, "model": {}}, "is not a checkpoint of sparsemem.train: it lacks step, "),
        (lambda good: _replace(good, config=[1, 2]), "its config is a list, not a dict"),
        (lambda good: _with_config(good, colour="blue"), "its config has options this version does not know: colour"),
        (lambda good: _with_config(good, steps="many"), "its config's steps is 'many', not int"),
        (lambda good: _with_config(good, max_level=2.5), r"its config's max_level is 2.5, not int \| None"),
        (lambda good: _with_config(good, model="gru"), "its config's model is 'gru', not one of dnc, ntm, sam, sdnc"),
    ],
    ids=[
        "empty",
        "cut-short",
        "text",
        "tensor",
        "keys-missing",
        "config-list",
        "unknown-option",
        "wrong-type",
        "not-none",
        "name",
    ],
)
def test_resume_refuses_a_damaged_or_foreign_checkpoint_naming_it(tmp_path, capsys, damage, message):
    Trainer(tiny(tmp_path)).save()
    path = tmp_path / CHECKPOINT
    _write(path, damage(path.read_bytes()))
    with pytest.raises(SystemExit) as exit:
        main(["--out", str(tmp_path), "--resume", "--no-progress"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert re.search(f"error: {re.escape(str(path))}:? .*{message}", err), err


def _replace(good: bytes, **entries) -> dict:
    return torch.load(io.BytesIO(good), weights_only=True) | entries


def _with_config(good: bytes, **options) -> dict:
    state = torch.load(io.BytesIO(good), weights_only=True)
    return state | {"config": state["config"] | options}


def test_time_budget_stops_training_and_adds_up_across_resumes(tmp_path):
    argv = [*TINY_ARGV, "--steps", "4", "--out", str(tmp_path)]
    assert main([*argv, "--time-budget", "1e-9"]) == 0  # spent by the first step
    first = json.loads((tmp_path / SUMMARY).read_text())
    assert first["steps"] == 1 and first["stopped_by"] == "time_budget" and first["train_seconds"] > 0
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["train_seconds"] == first["train_seconds"]

    assert main(["--out", str(tmp_path), "--resume"]) == 0  # still spent: no step
    again = json.loads((tmp_path / SUMMARY).read_text())
    assert again["steps"] == 1 and again["stopped_by"] == "time_budget"
    assert again["train_seconds"] == first["train_seconds"]

    assert main(["--out", str(tmp_path), "--resume", "--time-budget", "10"]) == 0
    last = json.loads((tmp_path / SUMMARY).read_text())
    assert last["steps"] == 4 and last["stopped_by"] == "steps"
    assert last["train_seconds"] > first["train_seconds"]
    assert last["sequences_per_second"] == pytest.approx(4 * 2 / last["train_seconds"])


def test_help_gives_every_option_its_text_choices_and_default(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--help"])
    assert exit.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for field in dataclasses.fields(Config):
        flag = "--" + field.name.replace("_", "-")
        assert flag in text
    options = len(dataclasses.fields(Config)) + 3  # and --resume, --no-progress, --dist-timeout
    assert text.count("(default: ") == options
    assert (
        "--model {dnc,ntm,sam,sdnc,lstm}" in text
        and "--babi-set {en,en-10k}" in text
        and "--index {exact,ivf,faiss-hnsw,faiss-ivf}" in text
    )


def test_the_summary_names_each_session_s_commit_steps_and_load(tmp_path):
    Trainer(tiny(tmp_path, steps=3)).run(progress=False)
    resumed = Trainer(tiny(tmp_path))
    summary = resumed.run(progress=False, resume=True)
    first, second = summary["sessions"]
    assert (first["steps"], second["steps"]) == ([0, 3], [3, 6])
    assert first["commit"] == source_commit() != ""
    assert len(second["load_average"]) == 3 and all(load >= 0 for load in second["load_average"])
    assert json.loads((tmp_path / SUMMARY).read_text())["sessions"] == summary["sessions"]
    saved = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert saved["sessions"] == summary["sessions"]


def test_the_memory_plot_has_a_panel_for_each_head(tmp_path, monkeypatch):
    titles = []
    monkeypatch.setattr(train, "_save_figure", lambda figure, path: titles.append([a.get_title() for a in figure.axes]))
    config = tiny(tmp_path, model="ntm", num_writes=2, num_reads=1)
    task = train.make_task(config)
    train.plot_memory_access(train.make_model(config, task), task, tmp_path / "memory_access.png")
    assert titles == [["input", "output", "write weights, head 0", "write weights, head 1", "read weights, head 0"]]
