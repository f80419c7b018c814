"""content_read's compiled CPU kernel (csrc/cpu/content.cpp) against the two ops it fuses."""

import pytest
import torch

import sparsemem as sm
from sparsemem.testing import op_inputs

CPP_UNAVAILABLE = sm.backends_for("content_read", "cpu").unavailable.get("cpp")
pytestmark = pytest.mark.skipif(CPP_UNAVAILABLE is not None, reason=str(CPP_UNAVAILABLE))


def test_content_read_matches_its_two_ops():
    memory, keys, strengths = op_inputs("content_read", torch.float64, B=3, N=4097, W=7, R=3)
    weights, reads = torch.ops.sparsemem.ext_content_read(memory, keys, strengths)
    torch.testing.assert_close(weights, torch.ops.sparsemem.ext_content_weights(memory, keys, strengths))
    torch.testing.assert_close(reads, torch.ops.sparsemem.ext_memory_read(memory, weights))
