"""Evaluate a trained run on fresh episodes, at another length, memory size or index.

    python -m sparsemem.evaluate runs/sam-kv --level 10000 --slots 1048576 --answers 256
    python -m sparsemem.evaluate runs/ntm-copy --level 120 --out copy-120.json

Loads RUN_DIR/checkpoint.pt (what `python -m sparsemem.train --out RUN_DIR` writes; read with
weights_only), builds the run's model again, with --slots N memory slots or another --index
where its parameters allow it, and scores it on --episodes (or enough for --answers) episodes
at --level, drawn from --seed. The default seed and 32 episodes are the held-out batch that
train's summary.json scores, so `error` at a run's level equals its final_query_error there.

`error` is the fraction of answer bits wrong: for key-value-recall the final queries' values
(the questions about any pair of the episode, as train's final_query_error), for the other
tasks the outputs at every answer step. Episodes run in chunks of --chunk time steps with the
state carried from chunk to chunk (no gradients: a sparse memory keeps only the versions a
held state needs), so an episode of 100,000 items costs the memory its writes need, not its
length's activations. The result is printed and written as JSON (atomically) to --out.
"""

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch

from sparsemem._files import atomic_write
from sparsemem._malloc import keep_freed_memory
from sparsemem.index import INDEXES
from sparsemem.models import MemoryModel
from sparsemem.tasks import TASKS, Batch, KeyValueRecall, RepeatCopy, Task
from sparsemem.train import (
    BABI,
    CHECKPOINT,
    MODELS,
    SPARSE,
    Config,
    check_device,
    make_model,
    make_task,
    peak_memory_bytes,
    progress_bar,
    read_checkpoint,
)

HELD_OUT_SEED = 1234
"""train's held-out episodes (its evaluate and final_query_error): the default --seed."""

DEFAULT_EPISODES = 32
"""train's held-out batch: the default --episodes and --batch-size."""


@dataclasses.dataclass
class Options:
    """What to evaluate and how; None: the run's own (task, level, slots, index, final_queries)."""

    run_dir: str
    task: str | None = None
    level: int | None = None
    slots: int | None = None
    index: str | None = None
    final_queries: int | None = None
    batch_size: int = DEFAULT_EPISODES
    episodes: int | None = None
    answers: int | None = None
    seed: int = HELD_OUT_SEED
    chunk: int = 1024
    device: str = "cpu"
    threads: int = 1
    out: str | None = None
    quiet: bool = False


def load_run(options: Options) -> tuple[Config, dict, Path]:
    """-> (the config to evaluate: the run's, changed by the options; the checkpoint; its path).
    ValueError naming what is wrong: no run, no or a damaged checkpoint, a bAbI run, or an option
    the run cannot take."""
    run = Path(options.run_dir)
    if not run.is_dir():
        raise ValueError(f"no run directory {run} (the --out of python -m sparsemem.train)")
    path = run / CHECKPOINT
    checkpoint = read_checkpoint(path, "cpu")
    saved = Config(**checkpoint["config"])
    if saved.task == BABI:
        raise ValueError(f"{path} is a bAbI run; evaluate scores the algorithmic tasks ({', '.join(TASKS)})")
    check_device(options.device)
    # eager, as trained or not: a compile (40-70 s on a CPU core) costs more than most evaluations take
    changes: dict = {"device": options.device, "out": str(run), "compile": False}
    if options.task is not None:
        changes["task"] = options.task
    if options.slots is not None:
        if saved.model not in MODELS:
            raise ValueError(f"--slots: a {saved.model} has no memory (only {', '.join(MODELS)} have one)")
        changes["num_slots"] = options.slots
    if options.index is not None:
        if saved.model not in SPARSE:
            raise ValueError(f"--index: a {saved.model} has no index (only {' and '.join(SPARSE)} have one)")
        changes["index"] = options.index
    if options.final_queries is not None:
        if KeyValueRecall.name not in (saved.task, options.task):
            raise ValueError(f"--final-queries is for --task {KeyValueRecall.name} only; this run is {saved.task}")
        changes["final_queries"] = options.final_queries
    return dataclasses.replace(saved, **changes), checkpoint, path


def level_task(config: Config, level: int | None, trained: Task) -> tuple[Task, int]:
    """The task config names, able to draw episodes at `level` (default: the trained top level)."""
    level = trained.max_level if level is None else level
    try:
        return make_task(dataclasses.replace(config, min_level=level, max_level=level)), level
    except ValueError as error:
        raise ValueError(f"--level {level} is not a level of {config.task}: {error}") from None


def build_model(config: Config, task: Task, checkpoint: dict, path: Path) -> MemoryModel:
    """The run's model with config's memory size and index, holding the checkpoint's weights.
    ValueError if that model cannot exist (e.g. --slots below K) or its parameters would differ
    from the trained ones in shape (a model whose parameters depend on N)."""
    trained = Config(**checkpoint["config"])
    try:
        model = make_model(config, task)
    except ValueError as error:
        raise ValueError(f"--slots {config.num_slots}: the {config.model} cannot be built: {error}") from None
    weights, expected = checkpoint["model"], model.state_dict()
    if weights.keys() != expected.keys():
        names = sorted(weights.keys() ^ expected.keys())
        raise ValueError(f"{path}: its weights are not those of a {config.model} as built now: {', '.join(names)}")
    changed = [
        f"{name} {list(weights[name].shape)} -> {list(value.shape)}"
        for name, value in expected.items()
        if weights[name].shape != value.shape
    ]
    if changed:
        what = "the task's input or output size" if config.task != trained.task else "N"
        raise ValueError(
            f"the {config.model}'s parameters depend on {what}: at --slots {config.num_slots} --task {config.task} "
            f"(trained at N={trained.num_slots} on {trained.task}) {'; '.join(changed)}. Evaluate it at "
            f"--slots {trained.num_slots}{'' if what == 'N' else f' on --task {trained.task}'}"
        )
    model.load_state_dict(weights)
    return model.to(config.device).eval()


def answers_per_episode(task: Task, level: int) -> int:
    """The answers one episode at `level` scores: the final queries for key-value-recall, the
    answer steps otherwise (for repeat-copy its fewest, with one repeat)."""
    if isinstance(task, KeyValueRecall):
        return task.final_queries
    if isinstance(task, RepeatCopy):
        return level + 1
    return int(task.sample(1, level, torch.Generator().manual_seed(0)).mask.sum())


@dataclasses.dataclass
class Counts:
    """Bits and answers summed over the episodes scored so far."""

    wrong: int = 0
    """Output bits in error at every answer step."""
    bits: int = 0
    scored_wrong: int = 0
    """Bits in error in the answers `error` counts (for key-value-recall, the final queries')."""
    scored_bits: int = 0
    answers: int = 0
    episodes: int = 0
    time_steps: int = 0
    seconds: float = 0.0


def score_batch(model: MemoryModel, task: Task, batch: Batch, chunk: int, counts: Counts, bar) -> None:
    """Run `batch` through the model in chunks of `chunk` time steps, the state carried, and add
    its errors to `counts`."""
    device = batch.inputs.device
    B, T = batch.mask.shape
    final_from = T - task.final_queries if isinstance(task, KeyValueRecall) else 0
    totals = torch.zeros(4, dtype=torch.int64, device=device)  # wrong, bits, scored wrong, scored bits
    state = None
    started = time.perf_counter()
    with torch.no_grad():
        for start in range(0, T, chunk):
            part = slice(start, start + chunk)
            logits, state = model(batch.inputs[:, part], state)
            mask = batch.mask[:, part].unsqueeze(-1).expand_as(logits)
            wrong = ((logits > 0) != (batch.targets[:, part] > 0.5)) & mask
            counted = torch.arange(start, start + logits.shape[1], device=device) >= final_from
            counted = counted.view(1, -1, 1) & mask
            totals += torch.stack([wrong.sum(), mask.sum(), (wrong & counted).sum(), counted.sum()])
            bar.update(logits.shape[1])
    wrong, bits, scored_wrong, scored_bits = totals.tolist()  # waits for the device: the time is the batch's
    counts.seconds += time.perf_counter() - started
    counts.wrong += wrong
    counts.bits += bits
    counts.scored_wrong += scored_wrong
    counts.scored_bits += scored_bits
    counts.answers += B * task.final_queries if isinstance(task, KeyValueRecall) else int(batch.mask.sum())
    counts.episodes += B
    counts.time_steps += T


def evaluate_run(options: Options) -> dict:
    """Evaluate the run options.run_dir names -> the result (what --out holds)."""
    config, checkpoint, path = load_run(options)
    for name in ("batch_size", "chunk", "threads") + (("episodes",) if options.episodes is not None else ()):
        if getattr(options, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer; got {getattr(options, name)}")
    if options.answers is not None and options.answers < 1:
        raise ValueError(f"--answers must be a positive integer; got {options.answers}")
    if options.episodes is not None and options.answers is not None:
        raise ValueError("give --episodes or --answers, not both")
    trained_task = make_task(Config(**checkpoint["config"]))
    task, level = level_task(config, options.level, trained_task)
    if isinstance(task, KeyValueRecall) and task.final_queries < 1:
        raise ValueError(f"--final-queries must be a positive integer to score {task.name}; got {task.final_queries}")
    model = build_model(config, task, checkpoint, path)
    torch.set_num_threads(options.threads)
    episodes = options.episodes or DEFAULT_EPISODES
    if options.answers is not None:
        per_episode = answers_per_episode(task, level)
        episodes = math.ceil(options.answers / per_episode)
    device = torch.device(options.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    generator = torch.Generator().manual_seed(options.seed)
    counts = Counts()
    batches = math.ceil(episodes / options.batch_size)
    bar = progress_bar(0, 0, enabled=not options.quiet and sys.stderr.isatty())
    try:
        for _ in range(batches):
            size = min(options.batch_size, episodes - counts.episodes)
            batch = task.sample(size, level, generator).to(device)
            if bar.total == 0:  # the episodes' length is known once one is drawn (repeat-copy's varies)
                bar.total = batches * batch.mask.shape[1]
            score_batch(model, task, batch, options.chunk, counts, bar)
            del batch
    finally:
        bar.close()
    return {
        "run_dir": str(options.run_dir),
        "checkpoint_step": checkpoint["step"],
        "task": task.name,
        "level": level,
        "slots": config.num_slots,
        "trained_slots": checkpoint["config"]["num_slots"],
        "error": counts.scored_wrong / counts.scored_bits if counts.scored_bits else float("nan"),
        "error_of": "the final queries' value bits" if isinstance(task, KeyValueRecall) else "the answer bits",
        "bits_error_per_sequence": counts.wrong / counts.episodes,
        "answers_scored": counts.answers,
        "bits_scored": counts.scored_bits,
        "episodes": counts.episodes,
        "time_steps": counts.time_steps,
        "ms_per_step": 1000 * counts.seconds / counts.time_steps,
        "seconds": counts.seconds,
        "peak_memory_mb": peak_memory_bytes(device) / 2**20,
        "evaluation": {name: getattr(options, name) for name in ("batch_size", "seed", "chunk", "threads", "device")},
        "config": dataclasses.asdict(config),
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sparsemem.evaluate",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("run_dir", metavar="RUN_DIR", help="a run's directory, as python -m sparsemem.train --out wrote it")
    add("--task", choices=list(TASKS), help="another task of the same input and output sizes; default: the run's")
    add("--level", type=int, help="sequence length, or items (pairs) for the recall tasks; default: the run's top")
    add("--slots", type=int, help="memory slots (N) to evaluate with; default: the run's")
    add("--index", choices=INDEXES, help="sam, sdnc: the nearest-neighbour index; default: the run's")
    add("--final-queries", type=int, help="key-value-recall: queries at each episode's end; default: the run's")
    add("--batch-size", type=int, default=DEFAULT_EPISODES, help="episodes run together (B)")
    count = parser.add_mutually_exclusive_group()
    count.add_argument("--episodes", type=int, help=f"episodes to score (default {DEFAULT_EPISODES})")
    count.add_argument("--answers", type=int, help="score enough episodes for at least this many answers")
    add("--seed", type=int, default=HELD_OUT_SEED, help="draws the episodes (the default: train's held-out ones)")
    add("--chunk", type=int, default=1024, help="time steps per forward; the state is carried between them")
    add("--device", default="cpu", help="cpu, cuda or cuda:INDEX")
    add("--threads", type=int, default=1, help="torch's CPU threads")
    add("--out", help="write the JSON here (default: RUN_DIR/evaluation.json)")
    add("--quiet", action="store_true", help="no progress bar (there is none when stderr is not a terminal)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(_parser().parse_args(argv))
    options = Options(**args)
    keep_freed_memory()  # a chunk's large tensors reuse the last chunk's pages (sparsemem/_malloc.py)
    try:
        result = evaluate_run(options)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = Path(options.out) if options.out is not None else Path(options.run_dir) / "evaluation.json"
    text = json.dumps(result, indent=2)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, lambda temp: temp.write_text(text + "\n"))
    except OSError as error:
        print(f"error: --out {out}: cannot write there ({error.strerror})", file=sys.stderr)
        return 2
    print(text)
    print(
        f"{result['task']} at level {result['level']}, N={result['slots']}: error {result['error']:.4f} over "
        f"{result['answers_scored']} answers ({result['ms_per_step']:.2f} ms per step); wrote {out}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
