"""A memory sharded across ranks (SAM / SDNC with shard_group=...): two gloo processes on the CPU
give the unsharded model's outputs, reads, weights, gradients and memory (float64), for a fresh,
a shared ([N, W]) and a per-sample ([B, N, W]) initial memory and a padded batch, with writes that
cross from one rank's slots to the other's; states stay values (rollback, redo, clone) across
shards; a rank that dies is reported, not waited for; bad arguments get clear errors.

The ranks are tests/memory/sharded_ranks.py, started once for all cases (starting a process that
imports torch is most of the cost), each collective under a timeout, each process under one.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sparsemem as sm
from tests.memory.sharded_ranks import TIMEOUT

ROOT = Path(__file__).parents[2]
RUN_TIMEOUT = 240
"""Seconds the ranks may take before the test kills them and fails: nothing hangs."""

TOLERANCE = 1e-10  # float64 (tests/tolerances.py); gradients relative to their scale

COMPARED = ["sam_fresh", "sam_shared", "sam_padded", "sdnc_fresh", "sdnc_per_sample", "sdnc_shared"]
COMPARED += ["sam_blocked_lru", "sdnc_blocked_lru"]  # the LRU in blocks (N >= 2^12) at a small N
OTHERS = ["sam_versions", "sdnc_versions", "errors"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cases: list[str], tmp_path: Path, world_size: int = 2) -> tuple[list[dict], list[tuple[int, str]]]:
    """Run the cases on `world_size` ranks -> (each rank's results, (exit status, stderr) per rank)."""
    port, out = _free_port(), tmp_path / "results"
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "tests.memory.sharded_ranks"]
    processes = [
        subprocess.Popen(
            [*command, str(rank), str(world_size), str(port), str(out), ",".join(cases)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(world_size)
    ]
    try:
        errors = [p.communicate(timeout=RUN_TIMEOUT)[1] for p in processes]
    except subprocess.TimeoutExpired:
        for p in processes:
            p.kill()
            p.communicate()
        pytest.fail(f"the sharded ranks took over {RUN_TIMEOUT} s")
    statuses = [(p.returncode, err) for p, err in zip(processes, errors, strict=True)]
    results = []
    for rank in range(world_size):
        path = Path(f"{out}.{rank}")
        results.append(json.loads(path.read_text()) if path.exists() else {})
    return results, statuses


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    results, statuses = launch(COMPARED + OTHERS, tmp_path_factory.mktemp("sharded"))
    for rank, (status, err) in enumerate(statuses):
        assert status == 0, f"rank {rank} failed:\n{err[-3000:]}"
    return results


@pytest.mark.slow
@pytest.mark.parametrize("case", COMPARED)
def test_sharded_model_computes_what_the_unsharded_one_does(ranks, case):
    for rank, results in enumerate(ranks):
        got = results[case]
        for name in ("outputs", "reads", "read_weights", "memory", "initial_grad"):
            assert got.get(name, 0.0) <= TOLERANCE, (rank, name, got)
        assert got["grads"] <= TOLERANCE * max(1.0, got["grad_scale"]), (rank, got)
        assert got["read_slots"] == 0 and got["write_slots"] == 0, (rank, got)
    assert (ranks[0][case]["lru_blocks"] > 1) == case.endswith("blocked_lru")
    # writes crossed the shards: both ranks hold written rows
    assert all(results[case]["written_here"] > 0 for results in ranks), [r[case]["written_here"] for r in ranks]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sam", "sdnc"])
def test_states_stay_values_across_shards(ranks, kind):
    for results in ranks:
        got = results[f"{kind}_versions"]
        assert got == {"rollback": 0.0, "clone": 0.0, "redo": 0.0, "vs_plain": got["vs_plain"]}, got
        assert got["vs_plain"] <= TOLERANCE, got


@pytest.mark.slow
def test_bad_shard_arguments_get_clear_errors(ranks):
    messages = ranks[0]["errors"]
    assert "N=1 slots cannot be split across P=2 ranks" in messages["too_few_slots"]
    assert "shard_group must be a torch.distributed ProcessGroup" in messages["not_a_group"]
    for rank, results in enumerate(ranks):  # both ranks refuse, and say where they differ
        other = 1 - rank
        assert (
            f"every rank of shard_group must call init_state alike: rank {rank} has B={2 + rank}, N=11"
            in results["errors"]["batch_differs"]
        ), results["errors"]
        assert f"; rank {other} has B={2 + other}, N=11" in results["errors"]["batch_differs"]


def test_a_shard_group_needs_an_initialised_process_group():
    assert not torch.distributed.is_initialized()
    with pytest.raises(ValueError, match=r"needs an initialised torch\.distributed process group"):
        sm.SAM(4, 8, num_slots=16, word_size=4, shard_group=object())
    # without shard_group nothing changes: the same classes as always
    assert type(sm.SDNC(4, 8, num_slots=16, word_size=4).memory) is sm.memory.SDNCMemory


@pytest.mark.slow
def test_a_dead_rank_is_reported_not_waited_for(tmp_path):
    results, statuses = launch(["kill"], tmp_path)
    assert statuses[1][0] == 3, statuses[1]
    assert statuses[0][0] == 0, statuses[0][1][-3000:]
    got = results[0]["kill"]
    assert got["error"] is not None and "ShardGroupError" in got["error"], got
    assert "over the shard group of P=2 ranks failed on rank 0" in got["error"], got
    assert got["seconds"] < TIMEOUT + 5, got
