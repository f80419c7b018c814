import os

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


NO_CUDA = "no CUDA device (torch.cuda.is_available() is False)"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here")
def test_without_a_gpu_cuda_says_so():
    assert _backends.availability()["cuda"] == NO_CUDA
    assert sm.backends_for("memory_read", "cuda").unavailable["cuda"] == NO_CUDA


def test_backends_for_says_which_backends_implement_an_op_and_why_the_others_cannot_run():
    ntm = sm.backends_for("ntm_address", "cpu")
    assert ntm.implemented == ("torch", "cpp", "triton") and "cuda" not in ntm.runnable
    assert ntm.unavailable["cuda"] == "ntm_address has no cuda kernel"
    read = sm.backends_for("memory_read", torch.device("cpu"))
    assert read.implemented == ("torch", "cpp", "triton", "cuda")
    # on the CPU, cuda cannot run: no GPU (or no cuda build), else the wrong device
    assert read.unavailable["cuda"] == (_backends.availability()["cuda"] or "cuda runs on cuda tensors, not cpu")
    assert read.chosen == _backends.backend_for("memory_read", torch.device("cpu"))
    assert set(read.runnable) | set(read.unavailable) == set(_backends.BACKENDS)
    if _backends.availability()["cpp"] is None:
        assert read.runnable[:2] == ("torch", "cpp")
    else:
        assert read.unavailable["cpp"] == _backends.availability()["cpp"]
        assert "reinstall with SPARSEMEM_BUILD_EXT=1" in read.unavailable["cpp"]
    if os.environ.get("TRITON_INTERPRET") == "1" and _backends.availability()["triton"] is None:
        assert "triton" in read.runnable


def test_backends_for_an_unknown_op_lists_the_ops():
    with pytest.raises(ValueError, match="unknown op 'nonsense'; the ops are allocation_weights"):
        sm.backends_for("nonsense")


def test_every_public_op_is_declared_once():
    assert sorted(_backends.ops(public=True)) == sorted(sm.ops.__all__)
    assert _backends.ops(public=False) == ("dnc_sequence", "journaled_write", "sam_sequence", "sdnc_sequence")


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


def test_extension_is_built_and_preferred_on_cpu(monkeypatch):
    monkeypatch.delenv("SPARSEMEM_BACKEND", raising=False)  # the preference, not a forced backend
    if _backends.availability()["cpp"] is not None:
        pytest.skip(_backends.availability()["cpp"])
    assert "cpu" in torch.ops.sparsemem.ext_info()
    assert _backends.backend_for("memory_read", torch.device("cpu")) == "cpp"


def test_kernel_choice_follows_sparsemem_backend(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("SPARSEMEM_BACKEND", "torch")
    assert _backends.kernel("memory_read", cpu) is _backends.implementations("memory_read")["torch"]
    monkeypatch.delenv("SPARSEMEM_BACKEND")
    chosen = _backends.implementations("memory_read")[_backends.backend_for("memory_read", cpu)]
    assert _backends.kernel("memory_read", cpu) is chosen
