"""Bad input gets a ValueError that names the problem in glossary letters."""

import pytest
import torch

import sparsemem as sm
from sparsemem._checks import inputs_checked
from sparsemem.testing import op_inputs


def test_wrong_rank_names_expected_shape():
    with pytest.raises(ValueError, match=r"memory must be \[B, N, W\]; got \[8, 64\]"):
        sm.ops.content_weights(torch.zeros(8, 64), torch.zeros(8, 1, 64), torch.ones(8, 1))


def test_mismatched_letter_names_its_source():
    memory, keys, strengths = op_inputs("content_weights")
    with pytest.raises(ValueError, match=r"keys must be \[B, R, W\] with W=5 \(from memory\)"):
        sm.ops.content_weights(memory, keys[..., :4], strengths)


def test_a_fixed_size_is_checked():
    args = list(op_inputs("dnc_read"))
    args[3] = args[3][..., :2]  # read_modes [B, R, 2]: one mode short
    with pytest.raises(ValueError, match=r"read_modes must be \[B, R, 3\]; got \[3, 3, 2\]"):
        sm.ops.dnc_read(*args)
    args = list(op_inputs("dnc_write"))
    args[5] = args[5].expand(-1, 2, -1)  # two write keys
    with pytest.raises(ValueError, match=r"write_key must be \[B, 1, W\]; got \[3, 2, 5\]"):
        sm.ops.dnc_write(*args)


def test_nan_is_caught_inside_a_model_forward_only_in_debug_mode(monkeypatch):
    """Inside inputs_checked (a model's forward) value checks are skipped, unless SPARSEMEM_DEBUG=1
    was set when the forward began."""
    memory, keys, strengths = op_inputs("content_weights")
    strengths[0, 1] = float("nan")
    with inputs_checked():
        sm.ops.content_weights(memory, keys, strengths)
    monkeypatch.setenv("SPARSEMEM_DEBUG", "1")
    with inputs_checked(), pytest.raises(ValueError, match="strengths contains NaN"):
        sm.ops.content_weights(memory, keys, strengths)


def test_wrong_dtype():
    memory, keys, strengths = op_inputs("content_weights")
    with pytest.raises(ValueError, match=r"keys is torch\.float32 but memory is torch\.float64"):
        sm.ops.content_weights(memory, keys.float(), strengths)
    with pytest.raises(ValueError, match="usage must be a floating-point tensor"):
        sm.ops.allocation_weights(torch.ones(2, 3, dtype=torch.int64))


def test_device_mismatch():
    memory, keys, strengths = op_inputs("content_weights")
    with pytest.raises(ValueError, match="keys is on meta but memory is on cpu"):
        sm.ops.content_weights(memory, keys.to("meta"), strengths)


def test_nan_strength():
    memory, keys, strengths = op_inputs("content_weights")
    strengths[0, 1] = float("nan")
    with pytest.raises(ValueError, match="strengths contains NaN"):
        sm.ops.content_weights(memory, keys, strengths)


def test_nan_in_memory_is_caught_in_debug_mode(monkeypatch):
    memory, keys, strengths = op_inputs("content_weights")
    memory[1, 2, 3] = float("nan")
    monkeypatch.setenv("SPARSEMEM_DEBUG", "1")
    with pytest.raises(ValueError, match="memory contains NaN"):
        sm.ops.content_weights(memory, keys, strengths)


def test_out_of_range_values():
    args = list(op_inputs("usage_update"))
    args[3] = args[3] + 1.5
    with pytest.raises(ValueError, match=r"free_gates must lie in \[0.0, 1.0\]"):
        sm.ops.usage_update(*args)
    args = list(op_inputs("ntm_address"))
    args[5] = args[5] * 0
    with pytest.raises(ValueError, match="sharpen must lie in"):
        sm.ops.ntm_address(*args)
    args = list(op_inputs("ntm_address"))
    args[4] = args[4][..., :2]
    with pytest.raises(ValueError, match="odd size S"):
        sm.ops.ntm_address(*args)


def test_out_of_range_indices_and_k():
    memory, indices, keys, strengths = op_inputs("sparse_read")
    indices[0, 0, 0] = 7
    with pytest.raises(ValueError, match=r"indices must hold slot ids in \[0, N=7\)"):
        sm.ops.sparse_read(memory, indices, keys, strengths)
    with pytest.raises(ValueError, match="indices must be int64"):
        sm.ops.sparse_read(memory, indices.int(), keys, strengths)
    with pytest.raises(ValueError, match=r"k must be in \[1, N=7\]"):
        sm.ops.topk_content(memory, keys, 8)


def test_erase_mask_must_be_bool():
    rows, weights, add, erase = op_inputs("sparse_write")
    with pytest.raises(ValueError, match="erase_rows must be a bool mask"):
        sm.ops.sparse_write(rows, weights, add, erase.float())


def test_not_a_tensor():
    with pytest.raises(ValueError, match="usage must be a tensor"):
        sm.ops.allocation_weights([[0.1, 0.2]])
