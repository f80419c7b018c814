"""SAM learns associative recall through its memory; with its reads zeroed it cannot.

The controller is feed-forward, so nothing crosses time steps except through the
memory: a pair (key, value) seen at step i has to be written, and found again by
content when its key comes back as a query. The ablation zeroes the reads and
stays at chance (BCE ln 2 = 0.69).
"""

import pytest
import torch
from torch import nn

import sparsemem as sm
from sparsemem.memory import SAMMemory

PAIRS, BITS, HIDDEN, N, W, K, BATCH = 3, 4, 32, 16, 16, 2, 16


class ZeroReads(SAMMemory):
    def step(self, state, interface):
        reads, state = super().step(state, interface)
        return reads * 0, state


def recall_batch(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """PAIRS steps of [key; value; 0], then the keys again in another order as [key; 0; 1]."""
    keys = torch.randint(0, 2, (BATCH, PAIRS, BITS), generator=generator).float()
    values = torch.randint(0, 2, (BATCH, PAIRS, BITS), generator=generator).float()
    order = torch.stack([torch.randperm(PAIRS, generator=generator) for _ in range(BATCH)]).unsqueeze(-1)
    query_keys, targets = keys.gather(1, order.expand(-1, -1, BITS)), values.gather(1, order.expand(-1, -1, BITS))
    store = torch.cat([2 * keys - 1, 2 * values - 1, torch.zeros(BATCH, PAIRS, 1)], dim=-1)
    query = torch.cat([2 * query_keys - 1, torch.zeros(BATCH, PAIRS, BITS), torch.ones(BATCH, PAIRS, 1)], dim=-1)
    return torch.cat([store, query], dim=1), targets


def train(zero_reads: bool, iterations: int) -> float:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    inputs = 2 * BITS + 1
    controller = nn.Sequential(nn.Linear(inputs + W, HIDDEN), nn.Tanh())
    model = sm.SAM(inputs, HIDDEN, num_slots=N, word_size=W, num_reads=1, k=K, output_size=BITS, controller=controller)
    if zero_reads:
        model.memory = ZeroReads(N, W, 1, K)
    with torch.no_grad():
        # start with sharp reads (strength ~4) and writes that go to the least recently used row
        model.interface.bias[W] = 3.0  # read strength
        model.interface.bias[-2:] = torch.tensor([3.0, -3.0])  # write gate alpha, interpolation gamma
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(iterations):
        x, targets = recall_batch(generator)
        y, _ = model(x)
        loss = nn.functional.binary_cross_entropy_with_logits(y[:, PAIRS:], targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return sum(losses[-10:]) / 10


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_sam_learns_associative_recall_and_the_ablation_does_not():
    assert train(zero_reads=False, iterations=150) < 0.35
    assert train(zero_reads=True, iterations=40) > 0.6
