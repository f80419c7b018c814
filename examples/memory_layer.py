"""A memory layer inside your own model: a token tagger that must remember what it has seen.

The task: a stream of random tokens; at every step say whether this token appeared earlier in
the stream. The model is an embedding, sm.DNC as a recurrent layer, and a linear head; it
trains on streams cut into chunks with truncated BPTT (state.detach()), and restarts some
streams mid-batch with state.reset(mask), as a streaming data loader would.

    python examples/memory_layer.py --steps 300
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import sparsemem as sm


class SeenBefore(nn.Module):
    def __init__(self, vocab: int, hidden: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 16)
        self.memory = sm.DNC(input_size=16, hidden_size=hidden, num_slots=24, word_size=16, num_reads=1)
        self.head = nn.Linear(hidden, 1)

    def forward(self, tokens: torch.Tensor, state: sm.ModelState | None = None):
        y, state = self.memory(self.embed(tokens), state)  # [B, T, hidden]
        return self.head(y).squeeze(-1), state


def seen_before(tokens: torch.Tensor, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels for a chunk given the tokens seen so far per stream ([B, vocab] bool), and the new history."""
    labels = torch.zeros(tokens.shape, dtype=torch.bool)
    history = history.clone()
    rows = torch.arange(tokens.shape[0])
    for t in range(tokens.shape[1]):
        labels[:, t] = history[rows, tokens[:, t]]
        history[rows, tokens[:, t]] = True
    return labels.float(), history


def main(steps: int = 300, batch: int = 16, chunk: int = 8, vocab: int = 24, seed: int = 0) -> float:
    """Train; -> the accuracy over the last 50 chunks."""
    torch.manual_seed(seed)
    model = SeenBefore(vocab)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    state, history = None, torch.zeros(batch, vocab, dtype=torch.bool)
    correct = []
    for step in range(steps):
        tokens = torch.randint(0, vocab, (batch, chunk))
        labels, history = seen_before(tokens, history)
        logits, state = model(tokens, state)
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        correct.append(((logits > 0) == (labels > 0.5)).float().mean().item())
        # Truncated BPTT: keep the values, cut the graph. Every 4 chunks a quarter of the
        # streams end and new ones start in their rows: reset those rows only.
        state = state.detach()
        if step % 4 == 3:
            ended = torch.rand(batch) < 0.25
            state = state.reset(ended)
            history[ended] = False
        if step % 50 == 49:
            print(f"step {step + 1}: loss {loss.item():.3f}, accuracy {sum(correct[-50:]) / 50:.3f}")
    return sum(correct[-50:]) / len(correct[-50:])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    main(args.steps, seed=args.seed)
