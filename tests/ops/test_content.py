"""content_read's compiled CPU kernel (csrc/cpu/content.cpp) against the two ops it fuses."""

import pytest
import torch

import sparsemem as sm
from sparsemem.reference import content_read_ref as reference_outputs
from sparsemem.testing import op_inputs
from tests.tolerances import tolerance

CPP_UNAVAILABLE = sm.backends_for("content_read", "cpu").unavailable.get("cpp")
pytestmark = pytest.mark.skipif(CPP_UNAVAILABLE is not None, reason=str(CPP_UNAVAILABLE))


def test_content_read_matches_its_two_ops():
    memory, keys, strengths = op_inputs("content_read", torch.float64, B=3, N=4097, W=7, R=3)
    weights, reads = torch.ops.sparsemem.ext_content_read(memory, keys, strengths)
    torch.testing.assert_close(weights, torch.ops.sparsemem.ext_content_weights(memory, keys, strengths))
    torch.testing.assert_close(reads, torch.ops.sparsemem.ext_memory_read(memory, weights))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("strength", [1.0, 1e2, 1e4])
def test_content_read_backward_is_stable_as_the_strength_grows(strength, dtype, use_backend):
    # Each key points near one slot's word (cosine ~0.99, the others far below), so a large strength
    # makes the softmax one-hot and the true gradient ~0: the kernel's softmax term
    # c_r = sum_n w_rn g'_rn must cancel g'_rn at the peak exactly. It once took the read part of c_r
    # from the forward's rounded reads: an error ~4e-8 x strength in float32 (4e-4 here at 1e4).
    use_backend("cpp")
    g = torch.Generator().manual_seed(1)
    memory = torch.randn(3, 33, 16, generator=g)
    keys = 2 * memory[:, [4, 17, 30]] + 0.3 * torch.randn(3, 3, 16, generator=g)
    inputs = [memory, keys, strength * (0.5 + torch.rand(3, 3, generator=g))]
    seeds = [torch.randn(3, 3, 33, generator=g), torch.randn(3, 3, 16, generator=g)]
    # the float64 reference on the same (rounded) inputs: only the kernel's own rounding is measured
    inputs64 = [x.to(dtype).double().requires_grad_(True) for x in inputs]
    want = torch.autograd.grad(reference_outputs(*inputs64), inputs64, [s.to(dtype).double() for s in seeds])
    leaves = [x.to(dtype).requires_grad_(True) for x in inputs]
    got = torch.autograd.grad(sm.ops.content_read(*leaves), leaves, [s.to(dtype) for s in seeds])
    for name, a, b in zip(("memory", "keys", "strengths"), got, want, strict=True):
        torch.testing.assert_close(a.double(), b, **tolerance(dtype), msg=lambda m, name=name: f"grad {name}: {m}")
