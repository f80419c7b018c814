"""The registered ops survive torch.compile, forward and backward; so does a dense model's step
(MemoryModel.compile_step)."""

import copy
import json

import pytest
import torch

import sparsemem as sm
from sparsemem import evaluate, train
from sparsemem.testing import op_inputs
from tests.tolerances import tolerance


def test_compile_dnc_like_step():
    memory, keys, strengths = op_inputs("content_weights", torch.float32, B=2, N=16, W=8, R=2)
    usage, write_w, read_w, free_gates = op_inputs("usage_update", torch.float32, B=2, N=16, R=2)
    memory.requires_grad_(True)

    def step(memory, keys, strengths):
        usage_t = sm.ops.usage_update(usage, write_w, read_w, free_gates)
        allocation = sm.ops.allocation_weights(usage_t)
        written = sm.ops.memory_write(memory, allocation, torch.full_like(keys[:, 0], 0.5), keys[:, 0])
        weights, reads = sm.ops.content_read(written, keys, strengths)
        return reads.sum() + weights.square().sum()

    eager = step(memory, keys, strengths)
    (eager_grad,) = torch.autograd.grad(eager, memory)
    compiled = torch.compile(step, fullgraph=True)(memory, keys, strengths)
    (compiled_grad,) = torch.autograd.grad(compiled, memory)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(compiled_grad, eager_grad)


@pytest.mark.parametrize("model_class", [sm.DNC, sm.NTM])
def test_a_compiled_step_gives_the_eager_outputs_and_gradients(model_class):
    torch.manual_seed(0)
    eager = model_class(5, 12, num_slots=7, word_size=4, num_reads=2).double()
    compiled = copy.deepcopy(eager).compile_step()
    x = torch.randn(3, 6, 5, dtype=torch.float64)
    results = []
    for model in (eager, compiled):
        y, state = model(x)
        (y.square().sum() + state.reads.sum()).backward()
        results.append((y, state.reads, [p.grad for p in model.parameters()]))
    (y_eager, reads_eager, grads_eager), (y_compiled, reads_compiled, grads_compiled) = results
    torch.testing.assert_close(y_compiled, y_eager, **tolerance(torch.float64))
    torch.testing.assert_close(reads_compiled, reads_eager, **tolerance(torch.float64))
    for got, want in zip(grads_compiled, grads_eager, strict=True):
        torch.testing.assert_close(got, want, **tolerance(torch.float64))


def test_a_sparse_model_refuses_to_compile_its_step():
    with pytest.raises(ValueError, match=r"compile_step is for dense memories .* a SAM's step searches its index"):
        sm.SAM(5, 12, num_slots=16, word_size=4, k=2).compile_step()


def test_train_compiles_the_step_when_asked_and_resumes_without(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--model", "ntm", "--task", "copy", "--steps", "2", "--batch-size", "2", "--hidden-size", "8"]
    argv += ["--slots", "6", "--word-size", "4", "--bits", "3", "--max-level", "2", "--out", str(out), "--no-progress"]
    assert train.main([*argv, "--compile"]) == 0
    assert json.loads((out / train.SUMMARY).read_text())["config"]["compile"] is True
    # the compile changes no number the run keeps, so a resume may drop it
    assert train.main(["--resume", "--out", str(out), "--steps", "3", "--no-compile", "--no-progress"]) == 0
    summary = json.loads((out / train.SUMMARY).read_text())
    assert summary["steps"] == 3 and summary["config"]["compile"] is False
    assert train.main(["--resume", "--out", str(out), "--steps", "4", "--compile", "--no-progress"]) == 0
    # evaluate runs the model eagerly whatever the run trained with
    assert evaluate.main([str(out), "--level", "2", "--batch-size", "2", "--out", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["config"]["compile"] is False


def test_one_compiled_graph_serves_every_length_and_no_grad_runs_eagerly():
    torch.manual_seed(0)
    model = sm.DNC(5, 12, num_slots=7, word_size=4, num_reads=2).compile_step()
    model(torch.randn(3, 4, 5))[0].sum().backward()  # compiles: the first step and the steps after it
    # the steps of any length see the same shapes and strides (x_t contiguous whatever T is)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for steps in (2, 7, 11):
            model(torch.randn(3, steps, 5))[0].sum().backward()
        with torch.no_grad():  # eager: a no-grad graph would be a compile of its own
            model(torch.randn(3, 9, 5))
