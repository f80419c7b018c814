"""bench/peers.py: at a tiny size, when pytorch-dnc is importable (installed, or a checkout named by
PYTORCH_DNC_PATH), the table and summary have every (model, N) row with both sides measured; and
without it, the run is skipped with the message that says how to get it, writing nothing."""

import json
import os

import pytest

from bench import peers

PEER_PATH = os.environ.get("PYTORCH_DNC_PATH")
TINY = {**peers.CONFIG, "steps": 3, "warmup": 1, "repeats": 1}


def test_without_the_peer_the_run_is_skipped_with_a_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(peers, "PEER_MODULE", "dnc_is_not_installed_here")
    assert peers.run(None, (8,), ("dnc",), tmp_path, timeout=60, config=TINY) is None
    out = capsys.readouterr().out
    assert "pytorch-dnc is not importable here; skipped" in out
    assert "--peer-path DIR" in out and "pip install dnc" in out
    assert list(tmp_path.iterdir()) == []


def test_a_peer_path_without_its_package_is_named_in_the_message(tmp_path, capsys):
    assert peers.run(str(tmp_path), (8,), ("dnc",), tmp_path / "out", timeout=60, config=TINY) is None
    assert f"--peer-path {tmp_path} holds no importable dnc/ package" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_a_tiny_run_writes_the_table_for_every_model_and_side(tmp_path):
    if peers.find_peer(PEER_PATH) is None:
        pytest.skip("pytorch-dnc is not importable: install dnc or name a checkout in PYTORCH_DNC_PATH")
    summary = peers.run(PEER_PATH, (8,), peers.MODELS, tmp_path, timeout=600, config=TINY)
    assert summary is not None
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["rows"] == summary["rows"]
    assert on_disk["header"]["config"]["steps"] == 3
    assert on_disk["header"]["peer"]["file"].endswith("__init__.py")
    assert any("faiss" in patch for patch in on_disk["header"]["patches"])  # faiss-cpu here: the GPU calls patched
    assert [(row["model"], row["log2_slots"]) for row in summary["rows"]] == [(m, 8) for m in peers.MODELS]
    for row in summary["rows"]:
        for mode in peers.MODES:
            assert row[f"sparsemem_{mode}_failure"] is None and row[f"sparsemem_{mode}_ms"] > 0
            assert row[f"sparsemem_{mode}_peak_gib"] > 0
            # the peer's: a time, or what failed (PyPI dnc 1.1.0's SAM and SDNC backward fail on torch 2)
            assert (row[f"peer_{mode}_ms"] is None) == (row[f"peer_{mode}_failure"] is not None)
        assert row["peer_fwd_ms"] > 0
        if row["peer_fwd+bwd_ms"] is not None:
            assert row["ratio"] == pytest.approx(row["peer_fwd+bwd_ms"] / row["sparsemem_fwd+bwd_ms"])
    sparse = [c for c in summary["cases"] if c["side"] == "peer" and c["model"] in ("sam", "sdnc")]
    assert len(sparse) == 2
    assert all(c["index"]["nlist"] >= 1 and c["index"]["nprobe"] >= 1 for c in sparse)
    table = (tmp_path / "peers.md").read_text()
    for name in ("SAM", "SDNC", "DNC"):
        assert f"| {name}, 2^8 |" in table
    assert "patched at run time" in table
    assert (tmp_path / "peers.png").stat().st_size > 0


def test_the_plot_has_a_panel_per_model_measured_and_marks_where_the_peer_failed(tmp_path, monkeypatch):
    cases = [
        {"side": "peer", "model": "sam", "log2_slots": 14, "fwd": {"step_ms": 5.0}, "fwd+bwd": {"step_ms": 15.0}},
        {"side": "sparsemem", "model": "sam", "log2_slots": 14, "fwd": {"step_ms": 2.0}, "fwd+bwd": {"step_ms": 3.0}},
        {"side": "peer", "model": "sam", "log2_slots": 16, "failure": "out of memory"},
        {"side": "sparsemem", "model": "sam", "log2_slots": 16, "fwd": {"step_ms": 2.2}, "fwd+bwd": {"step_ms": 3.5}},
    ]
    drawn = {}
    saved = peers.save_figure

    def keep(figure, path, **options):
        drawn["axes"] = figure.axes
        return saved(figure, path, **options)

    monkeypatch.setattr(peers, "save_figure", keep)
    path = peers.plot(peers.table_rows(cases), tmp_path / "peers.png")
    assert path.stat().st_size > 0
    (axis,) = drawn["axes"]  # SAM only: no empty SDNC or DNC panel
    assert axis.get_title() == "SAM"
    labels = [line.get_label() for line in axis.get_lines()]
    assert "pytorch-dnc: out of memory" in labels
    (cross,) = [line for line in axis.get_lines() if line.get_label() == "pytorch-dnc: out of memory"]
    assert list(cross.get_xdata()) == [2**16] and list(cross.get_ydata()) == [15.0]
