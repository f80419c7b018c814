"""The references against small cases worked out by hand."""

import math

import torch

from sparsemem import reference as ref


def t(values):
    return torch.tensor(values, dtype=torch.float64)


def test_allocation_hand_worked():
    # sorted: 0.1 (slot 1), 0.4 (slot 0), 0.9 (slot 2)
    # a[1] = (1 - 0.1) = 0.9; a[0] = (1 - 0.4) * 0.1 = 0.06; a[2] = (1 - 0.9) * 0.1 * 0.4 = 0.004
    allocation = ref.allocation_weights_ref(t([[0.4, 0.1, 0.9]]))
    torch.testing.assert_close(allocation, t([[0.06, 0.9, 0.004]]))


def test_allocation_ties_broken_by_slot_index():
    # equal usage: slot 0 comes first in the order, so it gets (1 - 0.5) and slot 1 gets (1 - 0.5) * 0.5
    torch.testing.assert_close(ref.allocation_weights_ref(t([[0.5, 0.5]])), t([[0.5, 0.25]]))


def test_allocation_gradient_at_usage_zero_and_one_is_finite_and_correct():
    usage = t([[0.0, 1.0, 0.5]]).requires_grad_(True)
    # sorted: 0 (slot 0), 0.5 (slot 2), 1 (slot 1): a = [1, 0 * 0.5 ... ] -> a0 = 1 - u0, a2 = (1 - u2) u0,
    # a1 = (1 - u1) u0 u2. d(sum a)/du0 = -1 + (1 - u2) + (1 - u1) u2 = -1 + 0.5 + 0 = -0.5;
    # d/du2 = -u0 + (1 - u1) u0 = 0; d/du1 = -u0 u2 = 0.
    ref.allocation_weights_ref(usage).sum().backward()
    torch.testing.assert_close(usage.grad, t([[-0.5, 0.0, 0.0]]))


def test_allocation_gradient_matches_finite_differences():
    usage = t([[0.3, 0.05, 0.7, 0.95, 0.5]]).requires_grad_(True)
    assert torch.autograd.gradcheck(ref.allocation_weights_ref, (usage,))


def test_usage_update_hand_worked():
    # psi = [1 - 0.5 * 1, 1 - 0.5 * 0] = [0.5, 1]; u = [(0.5 + 0.5 - 0.25) * 0.5, (0 + 1 - 0) * 1]
    usage = ref.usage_update_ref(t([[0.5, 0.0]]), t([[0.5, 1.0]]), t([[[1.0, 0.0]]]), t([[0.5]]))
    torch.testing.assert_close(usage, t([[0.375, 1.0]]))


def test_content_weights_hand_worked():
    memory = t([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    # cosines [1, 0, 1/sqrt 2], strength 2 -> softmax([2, 0, sqrt 2])
    weights = ref.content_weights_ref(memory, t([[[1.0, 0.0]]]), t([[2.0]]))
    logits = [2.0, 0.0, math.sqrt(2)]
    expected = t([[[math.exp(x) / sum(math.exp(y) for y in logits) for x in logits]]])
    torch.testing.assert_close(weights, expected, rtol=1e-5, atol=1e-5)  # eps 1e-6 inside the norms


def test_content_weights_of_zero_memory_are_uniform_with_finite_gradient():
    memory = torch.zeros(1, 4, 3, dtype=torch.float64, requires_grad=True)
    weights = ref.content_weights_ref(memory, t([[[1.0, 2.0, 3.0]]]), t([[5.0]]))
    torch.testing.assert_close(weights, torch.full((1, 1, 4), 0.25, dtype=torch.float64))
    weights[0, 0, 0].backward()
    assert torch.isfinite(memory.grad).all()


def test_memory_write_and_read_hand_worked():
    memory = t([[[1.0, 2.0], [3.0, 4.0]]])
    # row 0: [1, 2] * (1 - [1, 0]) + [5, 6] = [5, 8]; row 1 has weight 0: unchanged
    written = ref.memory_write_ref(memory, t([[1.0, 0.0]]), t([[1.0, 0.0]]), t([[5.0, 6.0]]))
    torch.testing.assert_close(written, t([[[5.0, 8.0], [3.0, 4.0]]]))
    torch.testing.assert_close(ref.memory_read_ref(memory, t([[[0.5, 0.5]]])), t([[[2.0, 3.0]]]))


def test_links_follow_write_order():
    link, precedence = torch.zeros(1, 2, 2, dtype=torch.float64), torch.zeros(1, 2, dtype=torch.float64)
    link, precedence = ref.link_update_ref(link, precedence, t([[1.0, 0.0]]))  # write slot 0
    torch.testing.assert_close(precedence, t([[1.0, 0.0]]))
    link, precedence = ref.link_update_ref(link, precedence, t([[0.0, 1.0]]))  # then slot 1
    torch.testing.assert_close(link, t([[[0.0, 0.0], [1.0, 0.0]]]))  # L[1, 0]: 1 was written after 0
    torch.testing.assert_close(precedence, t([[0.0, 1.0]]))
    forward, backward = ref.temporal_reads_ref(link, t([[[1.0, 0.0], [0.0, 1.0]]]))
    torch.testing.assert_close(forward, t([[[0.0, 1.0], [0.0, 0.0]]]))  # from slot 0 forward to slot 1
    torch.testing.assert_close(backward, t([[[0.0, 0.0], [1.0, 0.0]]]))  # from slot 1 back to slot 0


def test_link_diagonal_stays_zero():
    link, _ = ref.link_update_ref(torch.zeros(1, 3, 3, dtype=torch.float64), t([[0.2, 0.3, 0.5]]), t([[0.3, 0.3, 0.4]]))
    torch.testing.assert_close(torch.diagonal(link, dim1=1, dim2=2), torch.zeros(1, 3, dtype=torch.float64))


def test_ntm_shift_and_sharpen_hand_worked():
    # shift [0, 0, 1] is offset +1: w~[i] = w[i - 1]
    shifted = ref.ntm.circular_shift_ref(t([[[0.1, 0.2, 0.7]]]), t([[[0.0, 0.0, 1.0]]]))
    torch.testing.assert_close(shifted, t([[[0.7, 0.1, 0.2]]]))
    # [0.25, 0.75] ** 2 = [1, 9] / 16 -> [0.1, 0.9]
    torch.testing.assert_close(ref.ntm.sharpen_ref(t([[[0.25, 0.75]]]), t([[2.0]])), t([[[0.1, 0.9]]]))


def test_ntm_gate_zero_keeps_previous_weights():
    memory = torch.randn(1, 4, 3, dtype=torch.float64)
    prev = t([[[0.1, 0.2, 0.3, 0.4]]])
    no_shift, no_sharpen = t([[[0.0, 1.0, 0.0]]]), t([[1.0]])
    weights = ref.ntm_address_ref(memory, torch.randn(1, 1, 3, dtype=torch.float64), t([[3.0]]), t([[0.0]]),
                                  no_shift, no_sharpen, prev)  # fmt: skip
    torch.testing.assert_close(weights, prev)


def test_ntm_large_sharpening_does_not_underflow():
    weights = ref.ntm.sharpen_ref(torch.full((1, 1, 1000), 1e-3, dtype=torch.float32), torch.tensor([[60.0]]))
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0))


def test_topk_and_sparse_ops_hand_worked():
    memory = t([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    scores, indices = ref.topk_content_ref(memory, t([[[1.0, 0.0]]]), 2)
    assert indices.tolist() == [[[0, 2]]]
    torch.testing.assert_close(scores, t([[[1.0, 1 / math.sqrt(2)]]]), rtol=1e-5, atol=1e-5)
    new_rows = ref.sparse_write_ref(
        t([[[1.0, 2.0], [3.0, 4.0]]]), t([[0.5, 1.0]]), t([[2.0, 2.0]]), torch.tensor([[True, False]])
    )
    torch.testing.assert_close(new_rows, t([[[1.0, 1.0], [5.0, 6.0]]]))  # row 0 erased wholly, then added


def test_sparse_read_with_all_slots_equals_content_read():
    memory, keys, strengths = torch.randn(3, 7, 5, dtype=torch.float64), torch.randn(3, 3, 5), torch.rand(3, 3)
    keys, strengths = keys.double(), strengths.double() * 5
    indices = torch.arange(7).expand(3, 3, 7)
    sparse_weights, sparse_reads = ref.sparse_read_ref(memory, indices, keys, strengths)
    dense_weights, dense_reads = ref.content_read_ref(memory, keys, strengths)
    torch.testing.assert_close(sparse_weights, dense_weights)
    torch.testing.assert_close(sparse_reads, dense_reads)
