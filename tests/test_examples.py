"""examples/ run as written (a few steps each)."""

import importlib.util
from pathlib import Path

import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_memory_layer_example_trains():
    example = load("memory_layer")
    accuracy = example.main(steps=8, batch=4, chunk=4)
    assert 0.0 <= accuracy <= 1.0


def test_seen_before_labels():
    example = load("memory_layer")
    history = torch.zeros(1, 5, dtype=torch.bool)
    labels, history = example.seen_before(torch.tensor([[1, 2, 1, 3]]), history)
    assert labels.tolist() == [[0.0, 0.0, 1.0, 0.0]]
    labels, _ = example.seen_before(torch.tensor([[3, 4]]), history)
    assert labels.tolist() == [[1.0, 0.0]]
