"""The training CLI: exact resume, divergence handling, its files."""

import dataclasses
import json

import pytest
import torch

from sparsemem.train import CHECKPOINT, METRICS, Config, Trainer, TrainingDiverged, main

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


@pytest.mark.parametrize("model", ["dnc", "ntm"])
def test_resume_continues_bit_exactly(tmp_path, model):
    straight = Trainer(tiny(tmp_path / "straight", model=model))
    straight.run(progress=False)

    interrupted = Trainer(tiny(tmp_path / "resumed", model=model, steps=3))
    interrupted.run(progress=False)
    # An interrupted run may have logged past its checkpoint; resume drops those lines.
    with open(tmp_path / "resumed" / METRICS, "a") as log:
        log.write(json.dumps({"step": 4, "loss": 0.0}) + "\n")
    resumed = Trainer(tiny(tmp_path / "resumed", model=model))
    resumed.run(progress=False, resume=True)

    assert resumed.step == straight.step == 6
    assert resumed.curriculum.state_dict() == straight.curriculum.state_dict()
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(straight.generator.get_state(), resumed.generator.get_state())
    assert metrics(tmp_path / "resumed") == metrics(tmp_path / "straight")


def metrics(out, timed=("step_seconds", "peak_memory_mb")) -> list[dict]:
    """The logged records without the fields that measure the machine (they differ run to run)."""
    records = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
    return [{key: value for key, value in record.items() if key not in timed} for record in records]


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
    assert not list(tmp_path.glob(".*.tmp"))


def test_cli_writes_metrics_checkpoint_and_plots(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--model", "dnc", "--task", "associative-recall", "--steps", "4", "--batch-size", "2"]
    argv += ["--hidden-size", "8", "--num-slots", "6", "--word-size", "4", "--bits", "3", "--max-level", "3"]
    argv += ["--item-length", "2", "--controller", "feedforward"]
    argv += ["--log-every", "2", "--checkpoint-every", "2", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    assert "dnc on associative-recall" in capsys.readouterr().out
    names = {path.name for path in out.iterdir()}
    assert names == {METRICS, CHECKPOINT, "summary.json", "learning_curve.png", "memory_access.png"}
    records = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and set(summary["eval_bits_error"]) == {"2", "3"}
    for plot in ("learning_curve.png", "memory_access.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("model", ["sam", "sdnc"])
def test_cli_trains_the_sparse_models_and_reports_time_and_memory(tmp_path, capsys, model):
    out = tmp_path / model
    argv = ["--model", model, "--task", "copy", "--steps", "3", "--batch-size", "2", "--hidden-size", "8"]
    argv += ["--slots", "64", "--word-size", "4", "--num-reads", "2", "--k", "3", "--index", "exact"]
    argv += ["--link-k", "2", "--bits", "3", "--max-level", "2", "--device", "cpu", "--log-every", "1"]
    argv += ["--out", str(out), "--no-progress"]
    assert main(argv) == 0
    assert f"{model} on copy" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["num_slots"] == 64 and summary["config"]["k"] == 3
    records = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["step_seconds"] > 0 and r["peak_memory_mb"] > 1 for r in records)
    state = torch.load(out / CHECKPOINT, weights_only=True)["model"]
    assert state["interface.weight"].shape[0] == {"sam": 2 * 4 + 2 + 4 + 2, "sdnc": 2 * 4 + 2 + 4 + 2 + 3 * 2}[model]


def test_truncated_bptt_updates_once_per_window_and_scores_the_final_queries(tmp_path):
    # 8 pairs, a query after every 2 stores, 3 final queries: T = 8 + 4 + 3 = 15 steps, queries
    # at steps 2, 5, 8, 11, 12, 13, 14, so each window of 4 steps holds one: 4 updates a batch
    config = tiny(tmp_path, model="sam", task="key-value-recall", min_level=8, max_level=8, bptt=4, steps=2)
    config = dataclasses.replace(config, key_bits=6, query_every=2, recent=4, final_queries=3, num_slots=32)
    trainer = Trainer(config)
    summary = trainer.run(progress=False)
    assert [state["step"] for state in trainer.optimizer.state.values()] == [8] * len(trainer.optimizer.state)
    assert set(summary["final_query_error"]) == {8} and 0 <= summary["final_query_error"][8] <= 1


def test_cli_rejects_unknown_names(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'sorting'"):
        main(["--task", "sorting", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="unknown controller 'gru'"):
        main(["--controller", "gru", "--out", str(tmp_path)])
