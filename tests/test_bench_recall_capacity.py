"""bench/recall_capacity.py: a hand-set SAM recalls every pair its memory still holds, and no more."""

import pytest

from bench.recall_capacity import run

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_large_memory_recalls_every_pair_and_a_small_one_only_the_recent():
    large = run(pairs=100, num_slots=1 << 12, k=4, batch_size=2, device="cpu", seed=0)
    small = run(pairs=100, num_slots=32, k=4, batch_size=2, device="cpu", seed=0)
    assert large["final_query_bit_error"] == 0 and large["recent_query_bit_error"] == 0
    # 32 slots hold the last ~32 of 100 pairs: most final queries ask about overwritten ones
    assert small["final_query_value_error"] > 0.5 and small["recent_query_bit_error"] == 0
