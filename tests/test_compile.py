"""The registered ops survive torch.compile, forward and backward."""

import torch

import sparsemem as sm
from sparsemem.testing import op_inputs


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
