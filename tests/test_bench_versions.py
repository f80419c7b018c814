"""bench/bench_versions.py runs end to end on a tiny configuration and writes its JSON and plot."""

import json

from bench import bench_versions


def test_bench_versions_writes_rollback_and_stream_results(tmp_path):
    stem = tmp_path / "versions"
    args = ["--models", "sam", "--log2-slots", "6", "--steps", "2", "4", "--repeats", "1"]
    bench_versions.main([*args, "--stream-steps", "30", "--stream-log2-slots", "6", "--out", str(stem)])
    result = json.loads(stem.with_suffix(".json").read_text())
    assert [(row["N"], row["T"]) for row in result["rollback"]] == [(64, 2), (64, 4)]
    assert all(row[key] > 0 for row in result["rollback"] for key in ("step_ms", "undo_ms", "redo_ms"))
    stream = result["stream"][0]
    assert stream["steps"] == 30 and stream["rss"][-1]["step"] == 30
    assert 0 < max(point["retained_versions"] for point in stream["rss"]) <= 30 + 1  # and the root
    assert stem.with_suffix(".png").stat().st_size > 0


def test_bench_versions_keeps_the_part_it_does_not_run(tmp_path):
    stem = tmp_path / "versions"
    args = ["--models", "sam", "--log2-slots", "6", "--repeats", "1", "--stream-log2-slots", "6", "--out", str(stem)]
    bench_versions.main([*args, "--parts", "rollback", "--steps", "2"])
    first = json.loads(stem.with_suffix(".json").read_text())
    assert [row["T"] for row in first["rollback"]] == [2] and first["stream"] == []
    bench_versions.main([*args, "--parts", "stream", "--stream-steps", "5"])
    both = json.loads(stem.with_suffix(".json").read_text())
    assert both["rollback"] == first["rollback"] and both["stream"][0]["steps"] == 5
    assert set(both["headers"]) == {"rollback", "stream"}
    assert stem.with_suffix(".png").stat().st_size > 0
