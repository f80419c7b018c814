"""ntm_address's kernels where the generic op tests do not reach: a sharpening so large that most
weights underflow to exactly 0 (grad gamma takes 0 ln 0 = 0 there, as torch's pow does), and rows
longer than triton's tile."""

import pytest
import torch

import sparsemem as sm
from sparsemem.testing import op_inputs
from tests.conftest import cpu_backends, reference_with_grads
from tests.tolerances import tolerance


@pytest.mark.parametrize("backend", cpu_backends("ntm_address"))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_large_sharpening_zeroes_weights_and_keeps_gradients_finite(backend, dtype, use_backend):
    use_backend(backend)
    memory, key, strength, gate, shift, _, prev_w = op_inputs("ntm_address", dtype, B=2, N=300, W=5, R=2)
    sharpen = torch.tensor([[500.0, 1.0], [3000.0, 7.0]], dtype=dtype)
    args = [x.detach().requires_grad_(True) for x in (memory, key, strength * 10, gate, shift, sharpen, prev_w)]
    weights = sm.ops.ntm_address(*args)
    assert (weights[0, 0] == 0).any() and (weights[1, 0] == 0).any()  # underflowed entries
    seed = torch.randn(weights.shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
    grads = torch.autograd.grad(weights, args, seed)
    want_weights, want_grads = reference_with_grads("ntm_address", args, [seed])
    for got, want in zip([weights, *grads], [*want_weights, *want_grads], strict=True):
        assert got.isfinite().all()
        torch.testing.assert_close(got.double(), want, **tolerance(dtype, reduced_over=300))


@pytest.mark.parametrize("backend", cpu_backends("ntm_address"))
def test_rows_longer_than_a_tile_match_the_reference(backend, use_backend):
    # triton walks a row 1024 slots at a time: 2,500 slots end in a partial third tile
    use_backend(backend)
    args = [x.requires_grad_(True) for x in op_inputs("ntm_address", torch.float64, B=2, N=2500, W=3, R=2)]
    weights = sm.ops.ntm_address(*args)
    seed = torch.randn(weights.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grads = torch.autograd.grad(weights, args, seed)
    want_weights, want_grads = reference_with_grads("ntm_address", args, [seed])
    for got, want in zip([weights, *grads], [*want_weights, *want_grads], strict=True):
        torch.testing.assert_close(got, want, **tolerance(torch.float64))


@pytest.mark.parametrize("backend", cpu_backends("ntm_address"))
def test_slots_shifted_to_exactly_zero_take_the_gradient_of_zero_to_the_gamma(backend, use_backend):
    # gate 0 keeps a one-hot previous weighting and a one-hot shift moves it: every other slot is
    # exactly 0 before sharpening, where d r^gamma / d r is 1 at gamma = 1 and 0 above it
    use_backend(backend)
    memory, key, strength, gate, shift, _, prev_w = op_inputs("ntm_address", torch.float64, B=1, N=7, W=3, R=2)
    gate, prev_w, shift = torch.zeros_like(gate), torch.zeros_like(prev_w), torch.zeros_like(shift)
    prev_w[..., 2], shift[..., 0] = 1, 1
    sharpen = torch.tensor([[1.0, 2.5]], dtype=torch.float64)
    args = [x.detach().requires_grad_(True) for x in (memory, key, strength, gate, shift, sharpen, prev_w)]
    weights = sm.ops.ntm_address(*args)
    assert (weights == 0).sum() == 2 * 6
    seed = torch.randn(weights.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grads = torch.autograd.grad(weights, args, seed)
    want_weights, want_grads = reference_with_grads("ntm_address", args, [seed])
    for got, want in zip([weights, *grads], [*want_weights, *want_grads], strict=True):
        torch.testing.assert_close(got, want, **tolerance(torch.float64))
