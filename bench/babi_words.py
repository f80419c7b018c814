"""Where a bAbI update's time goes: milliseconds a word, forward and backward, of the model train
builds for --task babi (its word embedding, the model and its output layer: train.BabiModel), for
each model named, side by side in one process at the same sizes.

    python -m bench.babi_words                           # DNC and LSTM at the result tables' sizes
    python -m bench.babi_words --models dnc sdnc sam lstm --threads 1

A word is one step of one story: a batch of B stories of T words is timed whole (a forward in
training mode, then the backward of the logits' sum) and divided by T. The models alternate, one
batch each, so a change in the machine's load reaches all of them; the median of --repeats batches
after one warm-up. Freed memory is kept as train keeps it (`sm.keep_freed_memory()`). Writes
bench/results/babi/words.json and words.md.
"""

import argparse
import time
from pathlib import Path

import torch

import sparsemem as sm
from bench.common import RESULTS, header, measured_median, write_json, write_text
from sparsemem.train import BabiModel, Config

# The result tables' sizes (README, bAbI): a story of T words in batches of B, the joint run's
# vocabulary of V words (161 with its reserved tokens), hidden 128, embedding 32; a memory of N = 32
# words of W = 32 read by R = 2 heads.
# --dropout: the memory model's chosen bypass dropout (the LSTM's is on its output). SAM reads K = 4
# slots a head and SDNC links K_L = 4 a row: the sizes that suit 32 slots (docs/babi.md).
SIZES = dict(batch=32, words=164, vocabulary=161, hidden_size=128, embedding_size=32, dropout=0.3)
MEMORY = dict(num_slots=32, word_size=32, num_reads=2, k=4, link_k=4)


def ms_a_word(models: dict[str, BabiModel], batch: int, words: int, vocabulary: int, repeats: int) -> dict:
    """{model: {"forward_ms", "backward_ms"}}: the median ms a word of each, timed in turns, and
    every batch's ("forward_ms_each", "backward_ms_each")."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocabulary, (batch, words), generator=generator)
    lengths = torch.full((batch,), words, dtype=torch.int64)
    times = {name: {"forward": [], "backward": []} for name in models}
    for repeat in range(repeats + 1):  # the first round warms up
        for name, model in models.items():
            start = time.perf_counter()
            logits = model(tokens, lengths)
            middle = time.perf_counter()
            logits.sum().backward()
            end = time.perf_counter()
            model.zero_grad(set_to_none=True)
            if repeat:
                times[name]["forward"].append((middle - start) / words * 1e3)
                times[name]["backward"].append((end - middle) / words * 1e3)
    results = {}
    for name, phases in times.items():
        results[name] = {f"{phase}_ms": measured_median(values) for phase, values in phases.items()}
        results[name] |= {f"{phase}_ms_each": values for phase, values in phases.items()}
    return results


def table(results: dict) -> str:
    """Medians, with the fastest and slowest batch in brackets."""
    rows = ["| model | forward ms a word | backward ms a word | both (medians) |", "|---|---:|---:|---:|"]
    for name, r in results.items():
        cells = [f"{r[f'{phase}_ms']:.3f} [{min(r[f'{phase}_ms_each']):.3f}-{max(r[f'{phase}_ms_each']):.3f}]"
                 for phase in ("forward", "backward")]  # fmt: skip
        rows.append(f"| {name} | {cells[0]} | {cells[1]} | {r['forward_ms'] + r['backward_ms']:.3f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["dnc", "lstm"], choices=("dnc", "sdnc", "sam", "ntm", "lstm"))
    parser.add_argument("--batch", type=int, default=SIZES["batch"], help="stories a batch (B)")
    parser.add_argument("--words", type=int, default=SIZES["words"], help="words a story (T)")
    parser.add_argument("--vocabulary", type=int, default=SIZES["vocabulary"])
    parser.add_argument("--hidden-size", type=int, default=SIZES["hidden_size"])
    parser.add_argument("--embedding-size", type=int, default=SIZES["embedding_size"])
    parser.add_argument("--dropout", type=float, default=SIZES["dropout"], help="train's --dropout, every model")
    parser.add_argument("--slots", type=int, default=MEMORY["num_slots"])
    parser.add_argument("--repeats", type=int, default=5, help="timed batches per model (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch's threads (train's default: 1)")
    parser.add_argument("--out", type=Path, default=RESULTS / "babi" / "words.json")
    args = parser.parse_args(argv)
    for name in ("batch", "words", "vocabulary", "hidden_size", "embedding_size", "slots", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer; got {getattr(args, name)}")
    if not 0 <= args.dropout < 1:
        parser.error(f"--dropout must be in [0, 1); got {args.dropout}")

    torch.set_num_threads(args.threads)
    sm.keep_freed_memory()
    torch.manual_seed(0)
    memory = MEMORY | {"num_slots": args.slots, "k": min(MEMORY["k"], args.slots)}
    sizes = dict(hidden_size=args.hidden_size, embedding_size=args.embedding_size, dropout=args.dropout)
    models = {}
    for name in args.models:
        own = {} if name == "lstm" else memory
        models[name] = BabiModel(Config(model=name, task="babi", **sizes, **own), args.vocabulary)
    results = ms_a_word(models, args.batch, args.words, args.vocabulary, args.repeats)

    config = {"models": args.models, "batch": args.batch, "words": args.words, "vocabulary": args.vocabulary,
              **sizes, **memory, "repeats": args.repeats, "threads": args.threads}  # fmt: skip
    summary = {"header": header(config), "results": results}
    write_json(args.out, summary)
    text = table(results)
    write_text(args.out.with_suffix(".md"), f"# bAbI: ms a word\n\nConfig: {config}.\n\n{text}\n")
    print(text)
    return summary


if __name__ == "__main__":
    main()
