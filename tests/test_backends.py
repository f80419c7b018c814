import pytest
import torch

import sparsemem as sm
from sparsemem import _backends


def test_report_lists_every_backend_and_op(capsys):
    report = sm.backends()
    for backend in _backends.BACKENDS:
        assert backend in report
    for op in sm.ops.__all__:
        assert op in report
    assert capsys.readouterr().out.strip() == report.strip()


def test_unavailable_backends_say_why():
    for backend, reason in _backends.availability().items():
        assert reason is None or len(reason) > 10, backend


def test_forced_backend(monkeypatch):
    monkeypatch.setenv("SPARSEMEM_BACKEND", "torch")
    assert _backends.backend_for("memory_read", torch.device("cpu")) == "torch"
    monkeypatch.setenv("SPARSEMEM_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="SPARSEMEM_BACKEND='nonsense'"):
        _backends.backend_for("memory_read", torch.device("cpu"))


def test_forcing_an_unavailable_backend_is_an_error(monkeypatch):
    unavailable = [b for b, reason in _backends.availability().items() if reason is not None]
    if not unavailable:
        pytest.skip("every backend is available here")
    monkeypatch.setenv("SPARSEMEM_BACKEND", unavailable[0])
    with pytest.raises(RuntimeError, match="cannot run here"):
        _backends.backend_for("memory_read", torch.device("cpu"))


def test_extension_is_built_and_preferred_on_cpu():
    if _backends.availability()["cpp"] is not None:
        pytest.skip(_backends.availability()["cpp"])
    assert "cpu" in torch.ops.sparsemem.ext_info()
    assert _backends.backend_for("memory_read", torch.device("cpu")) == "cpp"


def test_kernel_choice_follows_sparsemem_backend(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("SPARSEMEM_BACKEND", "torch")
    assert _backends.kernel("memory_read", cpu) is _backends._KERNELS["memory_read"]["torch"]
    monkeypatch.delenv("SPARSEMEM_BACKEND")
    chosen = _backends._KERNELS["memory_read"][_backends.backend_for("memory_read", cpu)]
    assert _backends.kernel("memory_read", cpu) is chosen
