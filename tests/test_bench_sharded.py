"""bench/bench_sharded.py at a tiny N: P = 1 (unsharded and sharded) and P = 2 ranks, each a row
of the JSON and the table, with the bytes sent per step counted in the shard group's collectives."""

import json

import pytest

from bench.bench_sharded import main


@pytest.mark.slow
def test_world_sizes_each_get_a_row_with_time_memory_and_traffic(tmp_path):
    B, R, K, W = 2, 2, 3, 8
    argv = ["--slots", "64", "--batch", str(B), "--reads", str(R), "--k", str(K), "--word-size", str(W)]
    payload = main([*argv, "--steps", "2", "--repeats", "1", "--hidden", "8", "--out", str(tmp_path)])
    assert [(row["P"], row["sharded"]) for row in payload["rows"]] == [(1, False), (1, True), (2, True)]
    saved = json.loads((tmp_path / "sharded_sam_exact_n64.json").read_text())
    assert saved["rows"] == payload["rows"] and len(saved["load_before"]) == 3
    for row in payload["rows"]:
        assert len(row["ranks"]) == row["P"]
        for rank in row["ranks"]:
            assert rank["forward_ms_per_step"] > 0 and rank["backward_ms_per_step"] > 0
            assert rank["held_mib"] >= 0 and rank["peak_steps_mib"] >= 0
    # one rank sends nothing; two send, per step, the read rows (all_reduce of [B, R K, W] float32)
    # and the candidates (scores + ids, [B, R, K] each, twice: search, and the LRU's [2, B] offers)
    assert payload["rows"][1]["ranks"][0]["traffic_per_step"] == {"forward": {}, "backward": {}}
    forward = payload["rows"][2]["ranks"][0]["traffic_per_step"]["forward"]
    assert forward["all_reduce_bytes"] == B * R * K * W * 4
    assert forward["all_gather_bytes"] == B * R * K * (4 + 8) + 2 * B * 8
    assert "| sharded | 2 | 32 |" in (tmp_path / "sharded_sam_exact_n64.md").read_text()
