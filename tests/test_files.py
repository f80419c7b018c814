"""sparsemem._files.atomic_write: whole files or none, no temporaries left, a new file's mode."""

import os
import stat

import pytest

from sparsemem._files import atomic_write


def test_atomic_write_replaces_the_file_and_leaves_only_it(tmp_path):
    path = tmp_path / "deep" / "summary.json"
    atomic_write(path, lambda temporary: temporary.write_text("old"))
    assert atomic_write(path, lambda temporary: temporary.write_text("new")) == path
    assert path.read_text() == "new"
    assert [p.name for p in path.parent.iterdir()] == ["summary.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_text("old")

    def half_then_fail(temporary):
        temporary.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_the_temporary_keeps_the_suffix_and_the_file_gets_a_new_files_mode(tmp_path):
    suffixes = []
    umask = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "plot.png", lambda temporary: suffixes.append(temporary.suffix))
        assert suffixes == [".png"] and stat.S_IMODE(path.stat().st_mode) == 0o644
        os.umask(0o077)
        path = atomic_write(tmp_path / "private.md", lambda temporary: temporary.write_text("| a |\n"))
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        os.umask(umask)
