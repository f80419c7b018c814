"""bench/bench_breakdown.py on a tiny memory: every region of a step is found and the shares add up."""

import math

import pytest

from bench.bench_breakdown import CATEGORIES, markdown, run_case


@pytest.mark.parametrize("name", ["sam", "sdnc"])
def test_breakdown_finds_every_region_of_a_step(name, one_thread):
    result = run_case(name, 8, "exact", repeats=1)
    shares = result["shares"]
    assert set(shares) == set(CATEGORIES)
    assert math.isclose(sum(shares.values()), 1.0)
    assert all(share >= 0 for share in shares.values())
    for region in ("index.search", "index.update", "controller", "memory.write", "memory.read", "backward"):
        assert shares[region] > 0, region
    assert (shares["memory.links"] > 0) == (name == "sdnc")
    torch_case = {**result, "backend": "torch", "episode_seconds": [2 * t for t in result["episode_seconds"]]}
    table = markdown([result, torch_case], {"steps": 16})
    assert "| SDNC | default | exact |" in table or "| SAM | default | exact |" in table
    assert "| 2.00x |" in table
