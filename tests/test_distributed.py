"""Data-parallel training (torchrun, DistributedDataParallel on gloo): two ranks on the CPU train
the parameters one process trains on the same global batch, a resume is exact under the same
number of processes and refused under another, and a rank that dies or hangs is reported, not
waited for. Each run starts two processes of `python -m sparsemem.train` (as torchrun would:
RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in their environment, or torchrun itself), in
float64, with a --dist-timeout on every collective and a timeout on every process."""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sparsemem.train import CHECKPOINT, METRICS, SUMMARY, main
from tests.test_train_babi import release
from tests.tolerances import tolerance

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

BOOT = """
import json, os, sys, torch
torch.set_default_dtype(torch.float64)
from sparsemem.train import main
for argv, port in json.loads(sys.argv[1]):
    if port is not None:
        os.environ["MASTER_PORT"] = str(port)
    if main(argv):
        sys.exit(1)
"""
"""A rank: runs of the training CLI one after the other (one import of torch for all), with
float64 parameters and data (the tolerance is float64's); each on its own MASTER_PORT."""

RUN_TIMEOUT = 120
"""Seconds a launched run may take before the test kills it and fails: nothing hangs."""

TINY = ["--hidden-size", "8", "--slots", "6", "--word-size", "4", "--bits", "4", "--max-level", "3"]
TINY += ["--threshold", "10", "--window", "2", "--no-stop-at-threshold", "--log-every", "1", "--no-progress"]
TINY += ["--checkpoint-every", "3", "--dist-timeout", "30"]
"""A few milliseconds a step; the curriculum raises its level within the run."""


@dataclasses.dataclass
class Ranks:
    """A launched run: its processes, rank 0 first (or the one torchrun process)."""

    processes: list[subprocess.Popen]

    def wait(self, timeout: float = RUN_TIMEOUT) -> list[tuple[int, str, str]]:
        """-> (exit status, stdout, stderr) of each process; kills them all past `timeout`."""
        deadline = time.monotonic() + timeout
        try:
            outputs = [p.communicate(timeout=max(0.1, deadline - time.monotonic())) for p in self.processes]
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"a launched run took over {timeout} s")
        return [(p.returncode, out, err) for p, (out, err) in zip(self.processes, outputs, strict=True)]

    def kill(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.communicate()


def launch(*runs: list[str], world_size: int = 2, torchrun: bool = False) -> Ranks:
    """`world_size` ranks on gloo, each running the training CLI with the command lines `runs`
    in turn; torchrun: through torchrun --standalone (one run)."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    if torchrun:
        (argv,) = runs
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world_size}"]
        command += ["--no-python", sys.executable, "-c", BOOT, json.dumps([[argv, None]])]
        return Ranks([subprocess.Popen(command, env=env, **pipes)])
    runs_json = json.dumps([[argv, port] for argv, port in zip(runs, free_ports(len(runs)), strict=True)])
    env |= {"MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": str(world_size)}
    ranks = [{"RANK": str(rank), "LOCAL_RANK": str(rank)} for rank in range(world_size)]
    command = [sys.executable, "-c", BOOT, runs_json]
    return Ranks([subprocess.Popen(command, env=env | rank, **pipes) for rank in ranks])


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for free in sockets:
        free.bind(("127.0.0.1", 0))
    ports = [free.getsockname()[1] for free in sockets]
    for free in sockets:
        free.close()
    return ports


def succeeded(ranks: Ranks) -> str:
    """Wait for a run that must succeed -> rank 0's stdout (the other ranks print nothing)."""
    results = ranks.wait()
    for rank, (status, out, err) in enumerate(results):
        assert status == 0, f"rank {rank} exited {status}:\n{err[-3000:]}"
        assert rank == 0 or out == "", f"rank {rank} printed {out!r}"
    return results[0][1]


@pytest.fixture
def float64():
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(dtype)


def checkpoint(out: Path) -> dict:
    return torch.load(out / CHECKPOINT, weights_only=True)


def metrics(out: Path, timed=("step_seconds", "sequences_per_second", "peak_memory_mb")) -> list[dict]:
    records = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
    return [{key: value for key, value in record.items() if key not in timed} for record in records]


def assert_same_training(one: Path, ddp: Path) -> None:
    """Two runs' parameters, optimizer states and metrics agree to float64's tolerance, and
    their curricula and data positions exactly."""
    a, b = checkpoint(one), checkpoint(ddp)
    assert a["step"] == b["step"] and a["world_size"] == 1 and b["world_size"] == 2
    assert a["model"].keys() == b["model"].keys()
    for name, value in a["model"].items():
        assert value.dtype == torch.float64
        torch.testing.assert_close(b["model"][name], value, **tolerance(torch.float64), msg=name)
    moments = [(s["exp_avg"], s["exp_avg_sq"]) for s in a["optimizer"]["state"].values()]
    ddp_moments = [(s["exp_avg"], s["exp_avg_sq"]) for s in b["optimizer"]["state"].values()]
    torch.testing.assert_close(ddp_moments, moments, **tolerance(torch.float64))
    assert torch.equal(a["generator"], b["generator"])  # the same batches were drawn
    if "curriculum" in a:
        assert (b["curriculum"], b["steps_to_threshold"]) == (a["curriculum"], a["steps_to_threshold"])
    if "babi" in a:
        same = ("epoch", "position", "stories", "validated_step", "scores_since_best")
        assert {key: b["babi"][key] for key in same} == {key: a["babi"][key] for key in same}
        assert b["babi"]["best"]["step"] == a["babi"]["best"]["step"]
        torch.testing.assert_close(b["babi"]["best"]["model"], a["babi"]["best"]["model"], **tolerance(torch.float64))
    logged, ddp_logged = metrics(one), metrics(ddp)
    assert [r.keys() for r in ddp_logged] == [r.keys() for r in logged]
    for record, ddp_record in zip(logged, ddp_logged, strict=True):
        torch.testing.assert_close(ddp_record, record, **tolerance(torch.float64))


DNC = ["--model", "dnc", "--task", "copy", "--batch-size", "5", *TINY]
"""A global batch of 5: rows 0, 2, 4 on rank 0, rows 1, 3 on rank 1."""

NTM = ["--model", "ntm", "--task", "copy", "--batch-size", "4", *TINY]
SDNC = ["--model", "sdnc", "--task", "copy", "--k", "2", "--link-k", "2", "--batch-size", "4", *TINY]

SAM = ["--model", "sam", "--task", "associative-recall", "--k", "2", "--bptt", "4", "--batch-size", "3", *TINY]
"""Several updates a step (truncated BPTT); a global batch of 3: rows 0, 2 on rank 0, row 1 on rank 1."""

MODELS = {"sam": SAM, "ntm": NTM, "sdnc": SDNC}


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> Path:
    """Runs of two ranks: the DNC 6 steps straight (dnc/), 3 steps then resumed to 6
    (dnc-resumed/); the SAM, the NTM and the SDNC 4 steps (sam/, ntm/, sdnc/)."""
    root = tmp_path_factory.mktemp("ddp")
    resume = ["--out", str(root / "dnc-resumed"), "--resume", "--steps", "6", "--no-progress", "--dist-timeout", "30"]
    succeeded(
        launch(
            [*DNC, "--steps", "6", "--out", str(root / "dnc")],
            [*DNC, "--steps", "3", "--out", str(root / "dnc-resumed")],
            resume,
            *([*argv, "--steps", "4", "--out", str(root / model)] for model, argv in MODELS.items()),
        )
    )
    return root


def test_two_ranks_train_as_one_process_on_the_global_batch(ddp_runs, tmp_path, float64):
    assert main([*DNC, "--steps", "6", "--out", str(tmp_path)]) == 0
    assert_same_training(tmp_path, ddp_runs / "dnc")
    ranks = checkpoint(ddp_runs / "dnc")["ranks"]
    assert len(ranks) == 2 and ranks[0]["curriculum"] == ranks[1]["curriculum"]
    assert ranks[0]["curriculum"]["level"] > 1  # it rose during the run, on the all-reduced bits error


def test_resume_is_exact_under_the_same_number_of_processes(ddp_runs):
    straight, resumed = checkpoint(ddp_runs / "dnc"), checkpoint(ddp_runs / "dnc-resumed")
    assert resumed["step"] == straight["step"] == 6 and resumed["curriculum"] == straight["curriculum"]
    for name, value in straight["model"].items():
        assert torch.equal(resumed["model"][name], value), name
    for rank, state in enumerate(straight["ranks"]):
        assert torch.equal(resumed["ranks"][rank]["generator"], state["generator"])
    assert metrics(ddp_runs / "dnc-resumed") == metrics(ddp_runs / "dnc")


def test_resume_is_refused_under_another_number_of_processes(ddp_runs, tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit:
        main(["--out", str(ddp_runs / "dnc"), "--resume", "--steps", "9", "--no-progress"])
    assert exit.value.code == 2
    message = "was written by a run of 2 processes (torchrun), and this run has one process (no torchrun)"
    assert message in capsys.readouterr().err

    assert (
        main(["--model", "dnc", "--task", "copy", "--batch-size", "2", *TINY, "--steps", "3", "--out", str(tmp_path)])
        == 0
    )
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun --nproc-per-node 2 would; refused before joining
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as exit:
        main(["--out", str(tmp_path), "--resume", "--steps", "6", "--no-progress"])
    assert exit.value.code == 2
    assert "was written by a run of one process (no torchrun), and this run has 2 processes" in capsys.readouterr().err
    assert checkpoint(tmp_path)["step"] == 3


@pytest.mark.parametrize("model", MODELS)
def test_every_memory_model_trains_as_one_process(ddp_runs, tmp_path, float64, model):
    assert main([*MODELS[model], "--steps", "4", "--out", str(tmp_path)]) == 0
    assert_same_training(tmp_path, ddp_runs / model)


def test_the_lstm_on_babi_trains_as_one_process_under_torchrun(tmp_path, float64):
    # 36 training stories, 7 a batch: each epoch ends with a batch of one story, which leaves
    # rank 1 without a row; the validation is scored half on each rank.
    data = release(tmp_path / "tasks_1-20_v1-2")
    argv = ["--task", "babi", "--data-dir", str(data), "--babi-set", "en", "--babi-tasks", "1,8", "--model", "lstm"]
    argv += ["--batch-size", "7", "--hidden-size", "8", "--embedding-size", "6", "--eval-every", "3", "--steps", "7"]
    argv += ["--log-every", "1", "--checkpoint-every", "3", "--no-progress", "--dist-timeout", "30"]
    out = succeeded(launch([*argv, "--out", str(tmp_path / "ddp")], torchrun=True))
    assert "lstm on bAbI en tasks 1,8: validation error" in out
    assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    assert_same_training(tmp_path / "one", tmp_path / "ddp")
    assert 1 in [len(batch) for batch in checkpoint(tmp_path / "one")["babi"]["epoch"]]
    one, ddp = (json.loads((tmp_path / run / SUMMARY).read_text())["babi"] for run in ("one", "ddp"))
    assert ddp["best_step"] == one["best_step"] and ddp["validation_error"] == one["validation_error"]
    assert ddp["tasks"] == one["tasks"]


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_a_rank_that_dies_or_hangs_is_reported_and_the_checkpoint_kept(tmp_path, fault):
    out = tmp_path / "run"
    # the timeout outlasts the skew of the two ranks' starts on a loaded machine (init waits too)
    argv = ["--model", "dnc", "--task", "copy", "--batch-size", "2", *TINY[:-2], "--dist-timeout", "10"]
    ranks = launch([*argv, "--steps", "100000", "--checkpoint-every", "2", "--out", str(out)])
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not (out / CHECKPOINT).exists():
            assert ranks.processes[0].poll() is None, ranks.processes[0].communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.05)
        ranks.processes[1].send_signal(signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        started = time.monotonic()
        _, err = ranks.processes[0].communicate(timeout=60)
        status = ranks.processes[0].returncode
        waited = time.monotonic() - started
    finally:
        ranks.kill()
    assert status == 1, err[-3000:]
    assert "error: rank 0 of 2 stopped after step" in err and "Another rank has likely died or hung" in err
    assert waited < 40  # killed: at once (its connections close); hung: after --dist-timeout 10 s
    kept = checkpoint(out)
    assert kept["step"] % 2 == 0 and kept["world_size"] == 2
    assert f"the last good checkpoint {out / CHECKPOINT} (step {kept['step']}) is kept" in err
