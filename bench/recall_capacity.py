"""What a memory holds: key-value recall over one long episode, a large SAM against a small one.

    python -m bench.recall_capacity --pairs 20000 --slots 1048576 1024 [--device cuda]

The SAM's controller and projections are set by hand, not trained, so the number measured is
the memory's, not the learning's: a store step writes [key; value] to the least recently used
slot (write gate 1, interpolation gate 0); a query step writes nothing (write gate 0) and reads
with [key; 0] at a high strength, and the output is the value part of the read. A pair is then
recalled exactly when its row is still in memory and its key is the nearest, so with 20,000
pairs a SAM of 2^20 slots answers the final queries (about pairs from anywhere in the episode)
and one of 1024 slots cannot: its LRU has overwritten all but the last ~1024 pairs. Training
the same task: `python -m sparsemem.train --task key-value-recall` (README).
Writes bench/results/recall_capacity-<device>.json.
"""

import argparse
import time

import torch
from torch import nn

from bench.common import RESULTS, header, write_json
from sparsemem.models import SAM
from sparsemem.tasks import KeyValueRecall

SHARP = 5.0
"""tanh(5) = 0.9999: the controller turns each 0/1 input into a +-1 feature."""
STRENGTH = 100.0
"""Read strength: a softmax over the K candidates that puts ~all weight on the best match."""
GATE = 20.0
"""sigmoid(+-20): gates of 1 - 2e-9 and 2e-9, below the LRU's access threshold 0.005."""


def hand_set_sam(task: KeyValueRecall, num_slots: int, k: int) -> SAM:
    """A SAM whose weights store every pair in a fresh slot and recall it by its key."""
    keys, bits = task.key_bits, task.bits
    word = keys + bits
    features = task.input_size  # key, value, store flag, query flag
    controller = nn.Sequential(nn.Linear(features + word, features), nn.Tanh())
    model = SAM(features, features, num_slots, word, num_reads=1, k=k, controller=controller, output_size=bits)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        linear = controller[0]
        linear.weight[:, :features] = 2 * SHARP * torch.eye(features)
        linear.bias[:] = -SHARP
        # interface = [read key (W) | strength (1) | add (W) | write gate | interpolation gate]
        interface = model.interface
        interface.weight[:keys, :keys] = torch.eye(keys)
        interface.bias[word] = STRENGTH
        interface.weight[word + 1 : 2 * word + 1, :word] = torch.eye(word)
        interface.weight[2 * word + 1, features - 2] = GATE  # +1 at a store, -1 at a query
        interface.bias[2 * word + 2] = -GATE
        # y = [h ; r]: the value part of the read, sharpened into logits
        model.output.weight[:, features + keys :] = 10 * torch.eye(bits)
    return model


def run(pairs: int, num_slots: int, k: int, batch_size: int, device: str, seed: int) -> dict:
    task = KeyValueRecall(bits=8, min_pairs=pairs, max_pairs=pairs, key_bits=32, final_queries=64)
    batch = task.sample(batch_size, pairs, torch.Generator().manual_seed(seed))
    model = hand_set_sam(task, num_slots, k).to(device)
    inputs, targets = batch.inputs.to(device), batch.targets.to(device)
    started = time.perf_counter()
    with torch.no_grad():
        logits, _ = model(inputs)
    seconds = time.perf_counter() - started
    wrong = (logits > 0) != (targets > 0.5)
    final = slice(inputs.shape[1] - task.final_queries, None)
    recent = batch.mask.to(device).clone()
    recent[:, final] = False
    return {
        "slots": num_slots,
        "pairs": pairs,
        "final_query_bit_error": float(wrong[:, final].float().mean()),
        "final_query_value_error": float(wrong[:, final].any(-1).float().mean()),
        "recent_query_bit_error": float(wrong[recent].float().mean()),
        "steps": inputs.shape[1],
        "seconds_per_step": seconds / inputs.shape[1],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=20_000)
    parser.add_argument("--slots", type=int, nargs="+", default=[1 << 20, 1024])
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    results = []
    for num_slots in args.slots:
        result = run(args.pairs, num_slots, args.k, args.batch_size, args.device, args.seed)
        print(
            f"N={num_slots:>8}: final queries {100 * result['final_query_bit_error']:.1f}% bits wrong "
            f"({100 * result['final_query_value_error']:.1f}% of values), recent queries "
            f"{100 * result['recent_query_bit_error']:.1f}%, {1000 * result['seconds_per_step']:.2f} ms/step"
        )
        results.append(result)
    write_json(RESULTS / f"recall_capacity-{args.device}.json", {**header(vars(args)), "results": results})


if __name__ == "__main__":
    main()
