"""Train a memory model on an algorithmic task or on bAbI.

    python -m sparsemem.train --model dnc --task copy --steps 2000 --out runs/dnc-copy
    python -m sparsemem.train --model sam --task associative-recall --slots 1048576 --device cuda
    python -m sparsemem.train --model sam --task key-value-recall --bptt 64 --slots 1048576 --device cuda
    python -m sparsemem.train --model dnc --task babi --data-dir ~/data/tasks_1-20_v1-2 --babi-tasks 1

Writes to --out: metrics.jsonl (one JSON object per logged step), checkpoint.pt (every
--checkpoint-every steps and at the end, written atomically; --resume continues from it
bit-exactly: model, optimizer, RNG and curriculum), summary.json, and the PNG plots
learning_curve.png and memory_access.png. A NaN or inf loss, gradient, parameter or optimizer
state stops training with exit status 1 before anything is saved, so the last good checkpoint
stays in place. --resume takes the options not given from the checkpoint and refuses to change
the model, the task or the data (ON_RESUME lists what may change). --time-budget stops training
after so many minutes of it, across resumes. Every metrics line and summary.json report the
throughput (sequences_per_second); summary.json and the checkpoint list the sessions (a run and
its resumes) with the commit each ran and the machine's load average, which the speed depends on.

--task babi trains on the bAbI question-answering tasks read from --data-dir (the release the
user downloaded; nothing is read from anywhere else): an embedding of the words, the model
(--model lstm: a plain nn.LSTM, the baseline) and logits over the vocabulary, the loss at the
answer steps only. 10% of each task's training stories (seeded) are held out: scored every
--eval-every steps, the best of them kept in best.pt (with the vocabulary), training stops early
after --patience scores without a better one; at the end the test files are scored once from
best.pt, per task, in summary.json's "babi".

Under torchrun (torchrun --standalone --nproc-per-node P -m sparsemem.train ...) P processes
train data-parallel (DistributedDataParallel; gloo on the CPU, nccl on CUDA): --batch-size is the
global batch, rank r trains on its rows r::P, every decision comes from all-reduced values, rank
0 writes every file, and --resume needs the same P (TrainingRun; sparsemem.distributed).
"""

import abc
import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import resource
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from sparsemem import distributed
from sparsemem._files import atomic_write
from sparsemem._malloc import keep_freed_memory
from sparsemem._provenance import source_commit
from sparsemem.distributed import World
from sparsemem.index import INDEXES
from sparsemem.memory import SparseWeights
from sparsemem.models import DNC, NTM, SAM, SDNC, MemoryModel
from sparsemem.tasks import (
    TASKS,
    AssociativeRecall,
    Batch,
    Curriculum,
    KeyValueRecall,
    PrioritySort,
    RepeatCopy,
    Task,
    bits_in_error,
    sequence_loss,
)
from sparsemem.tasks.babi import (
    RESERVED,
    SETS,
    TASK_NUMBERS,
    BabiScore,
    EncodedStory,
    MissingTrainingFile,
    Vocabulary,
    answer_loss,
    bucket_batches,
    collate,
    encode_story,
    load_babi,
    split_stories,
)

MODELS: dict[str, type[MemoryModel]] = {"dnc": DNC, "ntm": NTM, "sam": SAM, "sdnc": SDNC}
"""The models by their command-line name; each takes (input_size, hidden_size, num_slots=N,
word_size=W, num_reads=R, output_size=...); sam and sdnc also k and index, sdnc link_k, ntm
num_writes."""

MODEL_NAMES = (*MODELS, "lstm")
"""--model: the memory models, and lstm (a plain nn.LSTM, the baseline)."""

SPARSE = ("sam", "sdnc")

BABI = "babi"
TASK_NAMES = (*TASKS, BABI)
"""--task: the algorithmic tasks, and babi (the bAbI question answering, read from --data-dir)."""

CONTROLLERS = ("lstm", "feedforward")
"""--controller: an LSTM cell (the default), or Linear + tanh with no state of its own."""

INTERFACE_INITS = ("linear", "new-slot")
"""--interface-init: the Linear's own bias, or the memory's init_interface_bias (dnc, ntm)."""

PLOT_SLOTS, PLOT_STEPS = 256, 200
"""The memory access plot shows at most these many slots and time steps."""

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"


def _option(default: Any, help: str, choices: Iterable[str] | None = None) -> Any:
    """A Config field: its default, its --help text and, for names, the values it takes."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclasses.dataclass
class Config:
    """Everything a run depends on; the command-line flags are these fields (--help says what
    each one does)."""

    model: str = _option(
        "dnc", "the model; sam and sdnc are the sparse ones, lstm a plain nn.LSTM (no memory)", MODEL_NAMES
    )
    task: str = _option("copy", "the algorithmic task, or babi (needs --data-dir)", TASK_NAMES)
    steps: int = _option(2000, "train to this many steps (batches) in all, counting those before a --resume")
    batch_size: int = _option(16, "sequences per batch (B)")
    lr: float = _option(3e-3, "Adam's learning rate")
    lr_half_life: float | None = _option(
        None, "halve the learning rate every this many steps (smoothly: lr 0.5^(step / this)); None: constant"
    )
    clip: float = _option(10.0, "clip the gradient's global norm to this (inf: no clipping)")
    controller: str = _option(
        "lstm", "an LSTM cell, or Linear + tanh (feedforward: only the memory crosses time steps)", CONTROLLERS
    )
    hidden_size: int = _option(64, "the controller's hidden size")
    dropout: float = _option(
        0.0,
        "dropout in training on the controller's output where it bypasses the memory to the output layer "
        "(Franke et al. 2018's bypass dropout: the memory, not the controller, has to carry what the answers "
        "need); --model lstm: on the LSTM's output",
    )
    num_slots: int = _option(16, "memory slots (N)")
    word_size: int = _option(16, "memory word size (W)")
    num_reads: int = _option(1, "read heads (R)")
    num_writes: int = _option(1, "ntm: write heads (the NTM paper's priority sort: 8)")
    k: int = _option(8, "sam, sdnc: slots read per head (K)")
    index: str = _option("exact", "sam, sdnc: the nearest-neighbour index", INDEXES)
    link_k: int = _option(8, "sdnc: link entries kept per row (K_L)")
    interface_init: str = _option(
        "linear",
        "dnc, ntm: the interface layer's starting bias: the Linear's own, or new-slot (each step writes "
        "a slot of its own: the DNC to free slots, freeing nothing, reading by content or forward; the NTM "
        "moving its write head one slot on; their memory's init_interface_bias. sam and sdnc always start "
        "with SAMMemory's)",
        INTERFACE_INITS,
    )
    bits: int = _option(8, "bits per vector of the task")
    item_length: int = _option(3, "associative-recall: vectors per item")
    max_repeats: int = _option(3, "repeat-copy: the most repeats asked for (drawn in [1, this] per batch)")
    repeats_follow_level: bool = _option(
        False,
        "repeat-copy: a batch of length L asks for at most min(L, --max-repeats) repeats, so a curriculum "
        "over lengths raises the repeats with them (the input still scales the count by --max-repeats)",
    )
    sort_outputs: int | None = _option(
        None, "priority-sort: vectors to output, highest priority first (the NTM paper: 16 of 20); None: all"
    )
    key_bits: int = _option(32, "key-value-recall: bits per key")
    query_every: int = _option(4, "key-value-recall: a query about a recent pair after every this many stores")
    recent: int = _option(16, "key-value-recall: those queries ask about one of the last this many pairs")
    final_queries: int = _option(16, "key-value-recall: queries about any pair of the episode, at its end")
    bptt: int = _option(
        0,
        "truncated backpropagation through time: an update every this many time steps, the state "
        "carried on detached (0: one update per sequence)",
    )
    min_level: int | None = _option(
        None, "the lowest difficulty: sequence length, or items for associative-recall; None: the task's"
    )
    max_level: int | None = _option(None, "the highest difficulty; None: the task's")
    curriculum: bool = _option(
        True, "raise the difficulty as the model masters it (--no-curriculum: every level from the start)"
    )
    threshold: float = _option(
        0.1,
        "bits in error per sequence, averaged over the last --window batches at the top level, "
        "that raise the curriculum's level and, at the highest, count as mastered",
    )
    window: int = _option(20, "batches --threshold averages over")
    curriculum_growth: float = _option(
        1.0, "on mastery the top level goes up by one, or times this when that is more (8 to 128 at 2: 4 stages)"
    )
    curriculum_top_share: float = _option(
        0.0, "the share of batches drawn at the curriculum's top level; the rest uniformly up to it"
    )
    stop_at_threshold: bool = _option(True, "stop once the highest level is mastered")
    seed: int = _option(0, "seeds the parameters and the data")
    device: str = _option("cpu", "cpu, cuda or cuda:INDEX")
    out: str = _option("runs/train", "the run's directory: metrics, checkpoint, summary, plots")
    checkpoint_every: int = _option(500, "write the checkpoint every this many steps (and at the end)")
    log_every: int = _option(10, "log the metrics every this many steps")
    threads: int = _option(1, "torch's CPU threads (small models run fastest on one)")
    compile: bool = _option(
        False,
        "dnc, ntm: torch.compile the model's time step (MemoryModel.compile_step), after a compile of about "
        "40 s: an NTM's step 1.1x faster, a DNC's slower than eager (which runs its steps as one op)",
    )
    time_budget: float | None = _option(
        None,
        "stop training (checkpoint, summary) after this many minutes of it in all, counting those "
        "before a --resume; None: no limit",
    )
    data_dir: str | None = _option(
        None,
        "babi: the bAbI release you downloaded, read from nowhere else: its root (tasks_1-20_v1-2/), "
        "a folder of qa*_train.txt and qa*_test.txt files, or the .tar.gz archive",
    )
    babi_set: str = _option("en-10k", "babi: train on 1,000 (en) or 10,000 (en-10k) questions per task", SETS)
    babi_tasks: str = _option("all", "babi: the tasks one model trains on together: all, or numbers as 1,2,3")
    babi_fallback_1k: bool = _option(
        False,
        "babi: a task with no training file in --babi-set (en-10k's task 3) trains on en/'s 1k file, "
        "with a warning and listed under fallback in summary.json; without it, a missing file is an error",
    )
    embedding_size: int = _option(32, "babi: the size of the word embedding the model reads")
    eval_every: int = _option(
        200,
        "babi: score the validation stories (10%% of each task's training stories, seeded) every this many "
        "steps, and at the end; the best-scored model is kept in best.pt",
    )
    patience: int | None = _option(
        None, "babi: stop after this many validation scores in a row without a better one; None: never"
    )


ON_RESUME = (
    "steps",
    "lr",
    "lr_half_life",
    "clip",
    "checkpoint_every",
    "log_every",
    "threads",
    "compile",
    "time_budget",
    "stop_at_threshold",
    "device",
    "out",
    "eval_every",
    "patience",
)
"""The options a --resume may change. Every other one fixes the model, the task or the data: a
--resume that gives it a value other than the checkpoint's is refused."""


class TrainingDiverged(RuntimeError):
    """A NaN or inf loss, gradient, parameter or optimizer state: training stopped, the last
    good checkpoint is kept."""


def make_task(config: Config) -> Task:
    if config.task not in TASKS:
        raise ValueError(f"unknown task {config.task!r}; expected one of {sorted(TASKS)}")
    task_cls = TASKS[config.task]
    default = task_cls(config.bits)
    min_level = config.min_level if config.min_level is not None else default.min_level
    max_level = config.max_level if config.max_level is not None else default.max_level
    if task_cls is AssociativeRecall:
        return task_cls(config.bits, min_level, max_level, item_length=config.item_length)
    if task_cls is RepeatCopy:
        return task_cls(
            config.bits,
            min_level,
            max_level,
            max_repeats=config.max_repeats,
            repeats_follow_level=config.repeats_follow_level,
        )
    if task_cls is PrioritySort:
        return task_cls(config.bits, min_level, max_level, outputs=config.sort_outputs)
    if task_cls is KeyValueRecall:
        options = ("key_bits", "query_every", "recent", "final_queries")
        return task_cls(config.bits, min_level, max_level, **{name: getattr(config, name) for name in options})
    return task_cls(config.bits, min_level, max_level)


def make_model(config: Config, task: Task) -> "MemoryModel | LSTMModel":
    return _sequence_model(config, task.input_size, task.output_size)


def _sequence_model(config: Config, input_size: int, output_size: int) -> "MemoryModel | LSTMModel":
    """The model config.model names, mapping [B, T, input_size] to [B, T, output_size]."""
    if config.model == "lstm":
        return LSTMModel(input_size, config.hidden_size, output_size, config.dropout)
    if config.model not in MODELS:
        raise ValueError(f"unknown model {config.model!r}; expected one of {list(MODEL_NAMES)}")
    if config.controller not in CONTROLLERS:
        raise ValueError(f"unknown controller {config.controller!r}; expected one of {CONTROLLERS}")
    controller = None
    if config.controller == "feedforward":
        # Nothing crosses time steps but the memory: the DNC paper's feed-forward controller.
        controller_in = input_size + config.num_reads * config.word_size
        controller = nn.Sequential(nn.Linear(controller_in, config.hidden_size), nn.Tanh())
    own = {"k": config.k, "index": config.index} if config.model in SPARSE else {}  # what only some models take
    if config.model == "sdnc":
        own["link_k"] = config.link_k
    if config.model == "ntm":
        own["num_writes"] = config.num_writes
    model = MODELS[config.model](
        input_size,
        config.hidden_size,
        num_slots=config.num_slots,
        word_size=config.word_size,
        num_reads=config.num_reads,
        output_size=output_size,
        controller=controller,
        bypass_dropout=config.dropout,
        **own,
    )
    if config.interface_init == "new-slot":
        model.memory.init_interface_bias(model.interface.bias)
    return model.compile_step() if config.compile else model


def _load_average() -> list[float]:
    """The machine's load average over 1, 5 and 15 minutes."""
    return [round(value, 2) for value in os.getloadavg()]


class LSTMState(NamedTuple):
    """LSTMModel's state: nn.LSTM's (h, c), each [1, B, hidden_size]; detach() as ModelState's,
    for truncated backpropagation."""

    h: Tensor
    c: Tensor

    def detach(self) -> "LSTMState":
        return LSTMState(self.h.detach(), self.c.detach())


class LSTMModel(nn.Module):
    """The baseline: nn.LSTM over the whole sequence (its fused loop), then a Linear to
    output_size. Called as the memory models are: x [B, T, input_size], state, lengths int64
    [B] -> (y [B, T, output_size], LSTMState); the steps t >= lengths[b] are skipped and y is
    zero there.

    The steps every row runs (t < min(lengths)) go through the fused loop on the padded batch;
    only the rows' differing tails are a packed sequence. The CPU LSTM over a packed sequence
    grows much faster than its length (one thread, B = 32, H = 128: T = 200 / 800 / 1,600 took
    0.96 / 40.7 / 150 s forward+backward packed against 0.16 / 0.49 / 0.95 s unpacked), and a
    length-bucketed batch's tails are short."""

    def __init__(self, input_size: int, hidden_size: int, output_size: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden_size, batch_first=True)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()  # on the outputs, in training
        self.output = nn.Linear(hidden_size, output_size)

    def forward(
        self, x: Tensor, state: tuple[Tensor, Tensor] | None = None, lengths: Tensor | None = None
    ) -> tuple[Tensor, LSTMState]:
        if lengths is None:
            hidden, state = self.lstm(x, state)
            return self.output(self.dropout(hidden)), LSTMState(*state)
        B, T = x.shape[:2]
        shortest = int(lengths.min())
        hidden, (h, c) = self.lstm(x[:, :shortest], state)
        if shortest < T:
            padded = hidden.new_zeros(B, T - shortest, hidden.shape[-1])
            rows = (lengths > shortest).nonzero().squeeze(1)
            if len(rows):
                tails = pack_padded_sequence(
                    x[rows, shortest:], (lengths[rows] - shortest).cpu(), batch_first=True, enforce_sorted=False
                )
                tail, (h_rows, c_rows) = self.lstm(tails, (h[:, rows], c[:, rows]))
                tail, _ = pad_packed_sequence(tail, batch_first=True, total_length=T - shortest)
                padded = padded.index_copy(0, rows, tail)
                h, c = h.index_copy(1, rows, h_rows), c.index_copy(1, rows, c_rows)
            hidden = torch.cat([hidden, padded], dim=1)
        active = torch.arange(T, device=x.device) < lengths.unsqueeze(1)
        return self.output(self.dropout(hidden)).masked_fill(~active.unsqueeze(-1), 0), LSTMState(h, c)


class BabiModel(nn.Module):
    """A word embedding (V words into config.embedding_size), the model config.model names, and
    its output Linear to the V words: tokens [B, T] int64, lengths [B] int64 -> logits [B, T, V],
    zero at the padded steps t >= lengths[b]."""

    def __init__(self, config: Config, vocabulary_size: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocabulary_size, config.embedding_size)
        self.sequence = _sequence_model(config, config.embedding_size, vocabulary_size)

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        logits, _ = self.sequence(self.embedding(tokens), lengths=lengths)
        return logits


@contextlib.contextmanager
def scoring(model: nn.Module) -> Iterator[None]:
    """A held-out score's context: no gradients and eval mode (no --dropout), the model's mode
    restored after."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(training)


EVAL_BATCH_SIZE = 64
"""Stories per batch when scoring: each row is scored alone, so it changes only the speed."""


def score_stories(model: BabiModel, stories: list[EncodedStory]) -> BabiScore:
    """The questions of `stories` answered wrongly, per task; batches of similar lengths."""
    device = next(model.parameters()).device
    score = BabiScore()
    with scoring(model):
        for indices in bucket_batches([len(story) for story in stories], EVAL_BATCH_SIZE):
            batch = collate([stories[i] for i in indices]).to(device)
            score.update(model(batch.tokens, batch.lengths), batch)
    return score


def babi_task_numbers(text: str) -> list[int]:
    """--babi-tasks: "all" or comma-separated task numbers ("1,2,3") -> the numbers, sorted."""
    if text == "all":
        return list(TASK_NUMBERS)
    parts = text.split(",")
    numbers = sorted({int(part) for part in parts if part.strip().isdigit()})
    if len(numbers) != len(parts) or not set(numbers) <= set(TASK_NUMBERS):
        raise ValueError(f"--babi-tasks must be all or distinct task numbers in 1..20 as 1,2,3; got {text!r}")
    return numbers


def evaluate(model: MemoryModel, task: Task, batch_size: int = 32, seed: int = 1234) -> dict[int, float]:
    """Bits in error per sequence at every level, on held-out batches fixed by `seed`."""
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    errors = {}
    with scoring(model):
        for level in task.eval_levels():
            batch = task.sample(batch_size, level, generator).to(device)
            logits, _ = model(batch.inputs)
            errors[level] = float(bits_in_error(logits, batch))
    return errors


def final_query_error(
    model: MemoryModel, task: KeyValueRecall, level: int, batch_size: int = 32, seed: int = 1234
) -> float:
    """The fraction of value bits in error over the final queries of key-value-recall episodes of
    `level` pairs (queries about any pair of the episode), on held-out batches fixed by `seed`."""
    batch = task.sample(batch_size, level, torch.Generator().manual_seed(seed)).to(next(model.parameters()).device)
    with scoring(model):
        logits, _ = model(batch.inputs)
    final = slice(batch.inputs.shape[1] - task.final_queries, None)
    return float(((logits[:, final] > 0) != (batch.targets[:, final] > 0.5)).float().mean())


def peak_memory_bytes(device: torch.device | str) -> int:
    """The most memory this process has held: allocated GPU memory on CUDA, resident set on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _all_finite(tensors: Iterable[Tensor], device: torch.device) -> Tensor:
    """Whether the floating-point tensors on `device` hold only finite values: a bool tensor on
    that device, so asking costs no host sync (Adam's step counters stay on the CPU: skipped).
    One float64 sum per tensor, a third of the time of isfinite().all(); it cannot overflow on
    float32 values, so it is non-finite exactly when an element is."""
    sums = [t.sum(dtype=torch.float64) for t in tensors if t.is_floating_point() and t.device == device]
    return torch.stack(sums).sum().isfinite() if sums else torch.ones((), dtype=torch.bool, device=device)


class TrainingRun(abc.ABC):
    """What every run shares: the model and its Adam optimizer, a data generator seeded by
    config.seed (so a run is a function of its config), the loop (steps, --time-budget, the
    metrics log, checkpoints, the divergence checks) and the checkpoint. A subclass says how a
    step trains, what it scores between steps, what its checkpoint adds, when it is done early
    and what its summary reports: Trainer for the algorithmic tasks, BabiTrainer for bAbI.
    The config is taken as it is; `check_config` is what the command line runs on it first.

    In a process group of P > 1 ranks (torchrun; see sparsemem.distributed) every rank draws the
    same global batch of config.batch_size rows and trains on its rows r::P through
    DistributedDataParallel, its loss scaled so that DDP's mean of the ranks' gradients is the
    gradient of the global batch's loss; the metrics, the stop decisions and the curriculum come
    from all-reduced values, so every rank decides alike. Rank 0 writes every file: the
    checkpoint holds every rank's RNG and curriculum state, and a resume needs the same P.
    """

    outputs: tuple[str, ...]
    """The files a run writes under --out."""

    shown: tuple[str, ...]
    """The metrics the progress bar shows, besides the step time and the peak memory."""

    def __init__(self, config: Config, model: nn.Module) -> None:
        self.config = config
        self.out = Path(config.out)
        self.world = World.current()
        if config.batch_size < self.world.size:
            raise ValueError(
                f"--batch-size {config.batch_size} is split over {self.world.size} processes: too few rows"
            )
        self.model = model.to(config.device)
        self.network = self.world.wrap(self.model)
        """What train_step calls: the DistributedDataParallel wrapper, or self.model in one process."""
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.last_checkpoint: int | None = None
        self.train_seconds = 0.0
        """Wall time spent in the training loop so far, over all the runs this one resumes."""
        self.sessions: list[dict] = []
        """The sessions before this one (a run and its resumes), as _sessions lists them: a result's provenance."""
        self._session: dict | None = None  # while run() trains: this session, as of its last checkpoint

    @abc.abstractmethod
    def train_step(self) -> dict:
        """One batch: forward, loss, backward, update. -> this step's metrics."""

    def _evaluate(self, last: bool) -> dict:
        """Scores taken after a step (counted in the time budget), added to its metrics and
        logged; `last`: training stops after this step. None by default."""
        return {}

    def _finished(self) -> str | None:
        """Why training is done before config.steps ("threshold", "patience"); None: it is not."""
        return None

    def _close(self) -> None:
        """What every rank does after the last step, before rank 0 scores the model (_results).
        Nothing by default."""
        return None

    def _rank_state(self) -> dict:
        """What each rank's own entry in a distributed checkpoint adds to its RNG states."""
        return {}

    def _load_rank_state(self, state: dict) -> None:
        """Continue from this rank's _rank_state."""
        return None

    @abc.abstractmethod
    def _task_state(self) -> dict:
        """What the checkpoint holds besides the model, the optimizer, the RNGs and the step."""

    @abc.abstractmethod
    def _load_task_state(self, state: dict) -> None:
        """Continue from a checkpoint's _task_state."""

    @abc.abstractmethod
    def _sequences(self) -> int:
        """Sequences trained on so far, over all the runs this one resumes."""

    @abc.abstractmethod
    def _results(self) -> dict:
        """The summary's entries about the trained model (scored after training, not timed)."""

    @abc.abstractmethod
    def _plot_curve(self, metrics: list[dict]) -> None:
        """learning_curve.png from the logged metrics."""

    @abc.abstractmethod
    def report(self, summary: dict) -> tuple[str, bool]:
        """-> (a line saying how training went, whether its scores are finite)."""

    def _update(self, loss: Tensor) -> tuple[float, float]:
        """Backward, clipped optimizer step -> (loss, gradient norm).

        Raises TrainingDiverged if the loss, the gradient norm, a parameter or the optimizer
        state is NaN or inf. All four come from the device in one read, the update's only host
        sync; a bad update is not undone, but nothing is saved after it."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip)
        if self.config.lr_half_life is not None:  # from the step alone: a resumed run follows the same schedule
            for group in self.optimizer.param_groups:
                group["lr"] = self.config.lr * 0.5 ** (self.step / self.config.lr_half_life)
        self.optimizer.step()
        device = loss.device
        optimizer_state = (t for state in self.optimizer.state.values() for t in state.values() if torch.is_tensor(t))
        checks = [
            loss.detach(),
            grad_norm.to(device),
            _all_finite(self.model.parameters(), device),
            _all_finite(optimizer_state, device),
        ]
        values = torch.stack([c.to(loss.dtype) for c in checks])
        if self.world.distributed:
            # DDP averaged the gradients, so the norms, the parameters and the optimizer states are
            # the same on every rank; the losses are the ranks' shares of the global batch's, times P.
            values = torch.cat([self.world.sum(values[:1] / self.world.size), values[1:]])
        loss_value, norm, parameters_finite, state_finite = values.tolist()
        problems = [
            (math.isfinite(loss_value), f"loss is {loss_value}"),
            (math.isfinite(norm), f"gradient norm is {norm}"),
            (parameters_finite, "a parameter is NaN or inf after the update"),
            (state_finite, "the optimizer state holds NaN or inf after the update"),
        ]
        for finite, problem in problems:
            if not finite:
                kept = (
                    f"the last good checkpoint {self.out / CHECKPOINT} (step {self.last_checkpoint}) is kept; "
                    "resume from it with --resume, perhaps with a lower --lr or --clip"
                    if self.last_checkpoint is not None
                    else "no checkpoint was written yet"
                )
                raise TrainingDiverged(f"{problem} at step {self.step + 1}: training stopped; {kept}")
        return loss_value, norm

    def state_dict(self) -> dict:
        """The checkpoint; in a distributed run every rank must call it (it gathers the ranks'
        RNG states on rank 0, under "ranks", and is whole there only)."""
        state = {
            "config": dataclasses.asdict(self.config),
            "step": self.step,
            "train_seconds": self.train_seconds,
            "sessions": self._sessions(),
            "world_size": self.world.size,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
        } | self._task_state()
        if self.world.distributed:
            rank = {"generator": state["generator"], "torch_rng": state["torch_rng"]} | self._rank_state()
            state["ranks"] = self.world.gather(rank)
        return state

    def _sessions(self) -> list[dict]:
        """The earlier sessions and, while run() trains, this one as of its last checkpoint: its
        commit (the source it ran, source_commit), its steps [first, last] and the machine's load
        average over 1, 5 and 15 minutes then (which a result's speed depends on)."""
        return [*self.sessions, *([self._session] if self._session is not None else [])]

    def save(self) -> Path:
        """Write out/checkpoint.pt atomically (temp file, fsync, rename); rank 0 writes it, every
        rank must call it."""
        path = self.out / CHECKPOINT
        if self._session is not None:
            self._session |= {"steps": [self._session["steps"][0], self.step], "load_average": _load_average()}
        state = self.state_dict()
        if self.world.writes:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda temp: torch.save(state, temp))
        self.last_checkpoint = self.step
        return path

    def load(self, path: Path | str | None = None) -> None:
        """Continue from a checkpoint (default out/checkpoint.pt) exactly where it was written,
        with this trainer's config's learning rate (a --resume may have changed it)."""
        path = Path(path) if path is not None else self.out / CHECKPOINT
        state = read_checkpoint(path, self.config.device)
        check_world_size(state, path, self.world.size)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr
        rank = state["ranks"][self.world.rank] if self.world.distributed else state
        self.generator.set_state(rank["generator"])
        torch.set_rng_state(rank["torch_rng"])
        self.step = state["step"]
        self.train_seconds = state.get("train_seconds", 0.0)  # absent from checkpoints older than --time-budget
        self.sessions = state.get("sessions", [])  # absent from checkpoints older than it
        self.last_checkpoint = self.step
        self._load_task_state(state)
        if self.world.distributed:
            self._load_rank_state(rank)

    def run(self, progress: bool = True, resume: bool = False) -> dict:
        """Train to config.steps (or until done early, or the time budget is spent), logging
        and checkpointing under config.out. -> the summary, also written to summary.json.

        In a distributed run every rank runs it and rank 0 alone writes; the others return the
        summary without the scores of the trained model (_results)."""
        writes = self.world.writes
        if writes:
            self.out.mkdir(parents=True, exist_ok=True)
        if resume:
            self.load()
        metrics = self._metrics_since_checkpoint() if writes else []
        self._session = {"commit": source_commit(), "steps": [self.step, self.step], "load_average": _load_average()}
        started = time.perf_counter()
        clock = started - self.train_seconds  # so that train_seconds counts on from the checkpoint's
        bar = progress_bar(self.config.steps, self.step, enabled=progress and writes)
        try:
            with open(self.out / METRICS, "a") if writes else contextlib.nullcontext() as log:
                while (stopped_by := self._stopped_by()) is None:
                    record = self.train_step()
                    self.train_seconds = self._elapsed(clock)
                    last = self._stopped_by() is not None
                    scores = self._evaluate(last)
                    record |= scores
                    self.train_seconds = self._elapsed(clock)
                    bar.update(1)
                    if log is not None and (self.step % self.config.log_every == 0 or last or scores):
                        metrics.append(record)
                        log.write(json.dumps(record) + "\n")
                        log.flush()
                        shown = {key: _short(record[key]) for key in self.shown if key in record}
                        step, peak = 1000 * record["step_seconds"], record["peak_memory_mb"]
                        bar.set_postfix(shown | {"step": f"{step:.1f}ms", "peak": f"{peak:.0f}MiB"})
                    if self.step % self.config.checkpoint_every == 0:
                        if log is not None:
                            os.fsync(log.fileno())  # the log up to a checkpoint is on the disk before it
                        self.save()
                if log is not None:
                    os.fsync(log.fileno())  # and before the last one
        finally:
            bar.close()
            if writes:
                self._plot_curve(metrics)
        self.save()
        self._close()
        summary = {
            "config": dataclasses.asdict(self.config),
            "steps": self.step,
            "stopped_by": stopped_by,
            "train_seconds": self.train_seconds,
            "sequences_per_second": self._sequences() / self.train_seconds if self.train_seconds > 0 else None,
            "sessions": self._sessions(),
        }
        self.sessions, self._session = summary["sessions"], None  # this session has ended
        if not writes:
            return summary
        summary |= self._results()
        summary["seconds"] = time.perf_counter() - started
        atomic_write(self.out / SUMMARY, lambda temp: temp.write_text(json.dumps(summary, indent=2)))
        return summary

    def _elapsed(self, clock: float) -> float:
        """Seconds since `clock`; in a distributed run under --time-budget the slowest rank's, so
        that every rank stops at the same step."""
        seconds = time.perf_counter() - clock
        if self.world.distributed and self.config.time_budget is not None:
            return float(self.world.max(torch.tensor([seconds], dtype=torch.float64, device=self.config.device)))
        return seconds

    def _step_cost(self, started: float) -> tuple[float, float]:
        """(the step's seconds since `started`, peak memory in MiB); in a distributed run the
        largest over the ranks."""
        seconds, peak = time.perf_counter() - started, peak_memory_bytes(self.config.device) / 2**20
        if self.world.distributed:
            cost = torch.tensor([seconds, peak], dtype=torch.float64, device=self.config.device)
            seconds, peak = self.world.max(cost).tolist()
        return seconds, peak

    def _stopped_by(self) -> str | None:
        """Why training stops now: "steps", a _finished reason or "time_budget"; None: it goes on."""
        if self.step >= self.config.steps:
            return "steps"
        if (finished := self._finished()) is not None:
            return finished
        if self.config.time_budget is not None and self.train_seconds >= 60 * self.config.time_budget:
            return "time_budget"
        return None

    def _metrics_since_checkpoint(self) -> list[dict]:
        """The logged metrics up to this run's step; lines an interrupted run logged past its
        last checkpoint are dropped, so a resumed log reads as one uninterrupted run. A last
        line cut short (power loss, full disk) is dropped with a warning."""
        path = self.out / METRICS
        if not path.exists():
            return []
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
        records = []
        for number, line in enumerate(lines, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                if number < len(lines):
                    raise ValueError(f"{path}: line {number} is not JSON ({error})") from None
                print(f"warning: {path}: dropped its last line, cut short: {line[:60]!r}", file=sys.stderr)
        records = [r for r in records if r["step"] <= self.step]
        atomic_write(path, lambda temp: temp.write_text("".join(json.dumps(r) + "\n" for r in records)))
        return records


def _short(value: object) -> object:
    return f"{value:.4f}" if isinstance(value, float) else value


class Trainer(TrainingRun):
    """A run on an algorithmic task: its seeded batches and its curriculum, checkpointed with
    the model. model: train this model instead of the one the config names (it must fit the
    task's input and output sizes)."""

    outputs = (METRICS, CHECKPOINT, SUMMARY, "learning_curve.png", "memory_access.png")
    shown = ("loss", "bits_error", "top_level")

    def __init__(self, config: Config, model: MemoryModel | None = None) -> None:
        self.task = make_task(config)
        torch.manual_seed(config.seed)
        super().__init__(config, model if model is not None else make_model(config, self.task))
        if isinstance(self.model, LSTMModel):  # no memory to plot
            self.outputs = tuple(name for name in self.outputs if name != "memory_access.png")
        self.curriculum = Curriculum(
            self.task.min_level,
            self.task.max_level,
            config.threshold,
            config.window,
            enabled=config.curriculum,
            growth=config.curriculum_growth,
            top_share=config.curriculum_top_share,
        )
        self.steps_to_threshold: int | None = None

    def train_step(self) -> dict:
        """One batch: forward, loss, backward, clipped update (one per `bptt` time steps with
        bptt, the state carried on detached). -> this step's metrics."""
        started = time.perf_counter()
        level = self.curriculum.draw(self.generator)
        sampled = self.task.sample(self.config.batch_size, level, self.generator)
        if self.world.distributed:  # every rank drew the global batch: its rows r::P
            rows = self.world.rows(self.config.batch_size)
            batch = Batch(sampled.inputs[rows], sampled.targets[rows], sampled.mask[rows]).to(self.config.device)
        else:
            batch = sampled.to(self.config.device)
        length = batch.inputs.shape[1]
        window = self.config.bptt or length
        state, outputs, losses, grad_norms = None, [], [], []
        for start in range(0, length, window):
            part = Batch(*(field[:, start : start + window] for field in (batch.inputs, batch.targets, batch.mask)))
            logits, state = self.network(part.inputs, state)
            outputs.append(logits.detach())
            scored = int(sampled.mask[:, start : start + window].sum())  # the global batch's, on the host: no sync
            if scored:
                loss, norm = self._update(self._loss(logits, part, scored))
                losses.append((loss * scored, scored))
                grad_norms.append(norm)
            state = state.detach()
        logits = torch.cat(outputs, dim=1)
        loss = sum(total for total, _ in losses) / max(1, sum(count for _, count in losses))
        grad_norm = max(grad_norms, default=0.0)
        self.step += 1
        bits_error = self._bits_error(logits, batch)
        self.curriculum.update(level, bits_error)
        if self.steps_to_threshold is None and self.curriculum.mastered:
            self.steps_to_threshold = self.step
        # the updates' reads and float(bits_error) waited for the device: the time is the step's, not its launch's
        seconds, peak = self._step_cost(started)
        return {
            "step": self.step,
            "loss": loss,
            "bits_error": bits_error,
            "level": level,
            "top_level": self.curriculum.level,
            "grad_norm": grad_norm,
            "step_seconds": seconds,
            "sequences_per_second": self.config.batch_size / seconds,
            "peak_memory_mb": peak,
        }

    def _loss(self, logits: Tensor, part: Batch, scored: int) -> Tensor:
        """The loss of one window: the BCE per scored bit; in a distributed run this rank's share,
        its bits' BCE summed times P / (the global batch's scored bits), so that DDP's mean of
        the ranks' gradients is the gradient of the global batch's mean. scored: the global
        batch's scored steps in the window."""
        if not self.world.distributed:
            return sequence_loss(logits, part)
        bits = part.mask.unsqueeze(-1).expand_as(logits)
        total = F.binary_cross_entropy_with_logits(logits[bits], part.targets[bits], reduction="sum")
        return total * (self.world.size / (scored * logits.shape[-1]))

    def _bits_error(self, logits: Tensor, batch: Batch) -> float:
        """Bits in error per sequence of the (global) batch."""
        if not self.world.distributed:
            return float(bits_in_error(logits, batch))
        wrong = ((logits > 0) != (batch.targets > 0.5)) & batch.mask.unsqueeze(-1)
        return float(self.world.sum(wrong.sum().float()) / self.config.batch_size)

    def _finished(self) -> str | None:
        return "threshold" if self.config.stop_at_threshold and self.steps_to_threshold is not None else None

    def _task_state(self) -> dict:
        return {"steps_to_threshold": self.steps_to_threshold, "curriculum": self.curriculum.state_dict()}

    def _rank_state(self) -> dict:
        return {"curriculum": self.curriculum.state_dict()}

    def _load_rank_state(self, state: dict) -> None:
        self.curriculum.load_state_dict(state["curriculum"])

    def _load_task_state(self, state: dict) -> None:
        self.curriculum.load_state_dict(state["curriculum"])
        self.steps_to_threshold = state["steps_to_threshold"]

    def _sequences(self) -> int:
        return self.step * self.config.batch_size

    def _results(self) -> dict:
        """Bits in error at every level (and for key-value-recall, on the final queries); the
        memory access plot."""
        results = {"steps_to_threshold": self.steps_to_threshold, "eval_bits_error": evaluate(self.model, self.task)}
        if isinstance(self.task, KeyValueRecall):
            levels = self.task.eval_levels()
            results["final_query_error"] = {level: final_query_error(self.model, self.task, level) for level in levels}
        if not isinstance(self.model, LSTMModel):
            plot_memory_access(self.model, self.task, self.out / "memory_access.png")
        return results

    def _plot_curve(self, metrics: list[dict]) -> None:
        _plot_learning_curve(metrics, self.out / "learning_curve.png", self.config)

    def report(self, summary: dict) -> tuple[str, bool]:
        reached = summary["steps_to_threshold"]
        verdict = f"mastered after {reached} steps" if reached is not None else "threshold not reached"
        if summary["stopped_by"] == "time_budget":
            verdict += f" (time budget spent at step {summary['steps']})"
        worst = max(summary["eval_bits_error"].values())
        text = f"{self.config.model} on {self.config.task}: {verdict}; held-out bits error per sequence <= {worst:.3f}"
        return text + " at every level", math.isfinite(worst)


VALIDATION_FRACTION = 0.1
"""The share of each bAbI task's training stories held out for validation."""

PASSED = 0.05
"""A bAbI task counts as passed below this test error (Weston et al. 2015)."""


class BabiTrainer(TrainingRun):
    """A run on the bAbI tasks config.babi_tasks, read from config.data_dir: one model for all
    of them, trained on their stories (less the validation stories) in length-bucketed,
    shuffled batches, epoch after epoch. The best validation score's model is kept (in the
    checkpoint, and in best.pt for the user) and scored on the test files at the end.

    vocabulary: a resumed run's (from its checkpoint); None: built from the training stories.
    """

    outputs = (METRICS, CHECKPOINT, BEST, SUMMARY, "learning_curve.png")
    shown = ("loss", "answer_error", "validation_error")

    def __init__(self, config: Config, vocabulary: Vocabulary | None = None) -> None:
        tasks = babi_task_numbers(config.babi_tasks)
        try:
            self.data = load_babi(config.data_dir, tasks, config.babi_set, config.babi_fallback_1k)
        except MissingTrainingFile as error:  # named as this CLI's users ask for the fallback
            raise MissingTrainingFile(error.task, error.where, error.spare, "--babi-fallback-1k") from None
        for task in self.data.fallback if World.current().writes else ():
            print(
                f"warning: {config.babi_set} has no training file for task {task}: it trains on en/'s "
                "(the 1k set; summary.json lists it under fallback)",
                file=sys.stderr,
            )
        train, validation = split_stories(self.data.train, VALIDATION_FRACTION, config.seed)
        too_few = [task for task in tasks if not validation[task]]
        if too_few:
            raise ValueError(f"bAbI tasks {too_few}: too few training stories to hold out {VALIDATION_FRACTION:.0%}")
        if vocabulary is None:
            vocabulary = Vocabulary.build(story for task in tasks for story in train[task])
        self.vocabulary = vocabulary
        self.train_stories = [encode_story(story, self.vocabulary) for task in tasks for story in train[task]]
        self.validation_stories = [encode_story(story, self.vocabulary) for task in tasks for story in validation[task]]
        torch.manual_seed(config.seed)
        super().__init__(config, BabiModel(config, len(self.vocabulary)))
        self.epoch: list[list[int]] = []
        """The training stories' indices in this epoch's batches; self.position: the next batch."""
        self.position = 0
        self.stories = 0
        self.best: dict | None = None
        """The best validation score so far: {"step", "validation_error", "model" (its state_dict)}."""
        self.validated_step: int | None = None
        self.scores_since_best = 0

    def train_step(self) -> dict:
        """One batch of stories: forward, loss at the answer steps, backward, clipped update."""
        started = time.perf_counter()
        if self.position == len(self.epoch):
            lengths = [len(story) for story in self.train_stories]
            self.epoch, self.position = bucket_batches(lengths, self.config.batch_size, self.generator), 0
        stories = [self.train_stories[i] for i in self.epoch[self.position]]
        self.position += 1
        if not self.world.distributed:
            batch = collate(stories).to(self.config.device)
            logits = self.network(batch.tokens, batch.lengths)
            loss, grad_norm = self._update(answer_loss(logits, batch))
            wrong = logits.detach()[batch.mask].argmax(-1) != batch.targets[batch.mask]
            answer_error = float(wrong.float().mean())
        else:
            loss, grad_norm, answer_error = self._train_rows(stories)
        self.step += 1
        self.stories += len(stories)
        seconds, peak = self._step_cost(started)
        return {
            "step": self.step,
            "loss": loss,
            "answer_error": answer_error,
            "grad_norm": grad_norm,
            "step_seconds": seconds,
            "sequences_per_second": len(stories) / seconds,
            "peak_memory_mb": peak,
        }

    def _train_rows(self, stories: list[EncodedStory]) -> tuple[float, float, float]:
        """A distributed step on this rank's rows r::P of the global batch `stories`: the
        cross-entropy summed over its answer steps times P / (the global batch's answer steps),
        so that DDP's mean of the ranks' gradients is the global batch's. -> (loss, gradient
        norm, answer error) of the global batch."""
        mine = stories[self.world.rows(len(stories))]
        # An epoch's last batch may have fewer stories than ranks: a rank left without one runs
        # the first story with no answer step scored (DDP needs every rank's backward) and adds 0.
        batch = collate(mine or stories[:1]).to(self.config.device)
        if not mine:
            batch = dataclasses.replace(batch, mask=torch.zeros_like(batch.mask))
        answers = sum(int((story.question >= 0).sum()) for story in stories)
        logits = self.network(batch.tokens, batch.lengths)
        total = F.cross_entropy(logits[batch.mask], batch.targets[batch.mask], reduction="sum")
        loss, grad_norm = self._update(total * (self.world.size / answers))
        wrong = logits.detach()[batch.mask].argmax(-1) != batch.targets[batch.mask]
        return loss, grad_norm, float(self.world.sum(wrong.sum().float()) / answers)

    def _evaluate(self, last: bool) -> dict:
        """Every --eval-every steps and after the last: the validation error (the mean over the
        tasks of the wrongly answered questions' fraction); a better one than before is kept."""
        if self.step % self.config.eval_every and not last:
            return {}
        return {"validation_error": self._validate()}

    def _validate(self) -> float:
        error = self._score_validation().mean_error()
        self.validated_step = self.step
        if self.best is not None and error >= self.best["validation_error"]:
            self.scores_since_best += 1
            return error
        model = {name: value.detach().clone() for name, value in self.model.state_dict().items()}
        self.best = {"step": self.step, "validation_error": error, "model": model}
        self.scores_since_best = 0
        self._save_best()
        return error

    def _score_validation(self) -> BabiScore:
        """The validation stories' score; in a distributed run rank r scores the batches r::P
        and the counts are summed over the ranks."""
        if not self.world.distributed:
            return score_stories(self.model, self.validation_stories)
        score = BabiScore()
        device = next(self.model.parameters()).device
        batches = bucket_batches([len(story) for story in self.validation_stories], EVAL_BATCH_SIZE)
        with scoring(self.model):
            for indices in batches[self.world.rows(len(batches))]:
                batch = collate([self.validation_stories[i] for i in indices]).to(device)
                score.update(self.model(batch.tokens, batch.lengths), batch)
        tasks = sorted({story.task for story in self.validation_stories})
        counts = [[score.questions.get(task, 0), score.wrong.get(task, 0)] for task in tasks]
        questions, wrong = self.world.sum(torch.tensor(counts, device=device)).T.tolist()
        score.questions, score.wrong = dict(zip(tasks, questions, strict=True)), dict(zip(tasks, wrong, strict=True))
        return score

    def _save_best(self) -> None:
        """best.pt, written atomically: the best model with its vocabulary and config, plain
        values only (torch.load(weights_only=True) reads it); rank 0 writes it."""
        if not self.world.writes:
            return
        best = self.best | {"config": dataclasses.asdict(self.config), "vocabulary": self.vocabulary.to_dict()}
        atomic_write(self.out / BEST, lambda temp: torch.save(best, temp))

    def _finished(self) -> str | None:
        patience = self.config.patience
        return "patience" if patience is not None and self.scores_since_best >= patience else None

    def _task_state(self) -> dict:
        babi = {
            "vocabulary": self.vocabulary.to_dict(),
            "epoch": self.epoch,
            "position": self.position,
            "stories": self.stories,
            "best": self.best,
            "validated_step": self.validated_step,
            "scores_since_best": self.scores_since_best,
        }
        return {"babi": babi}

    def _load_task_state(self, state: dict) -> None:
        babi = state["babi"]
        if Vocabulary.from_dict(babi["vocabulary"]) != self.vocabulary:
            raise ValueError(f"{self.out / CHECKPOINT}: its vocabulary is not this run's (was the data changed?)")
        self.epoch, self.position, self.stories = babi["epoch"], babi["position"], babi["stories"]
        self.best, self.validated_step = babi["best"], babi["validated_step"]
        self.scores_since_best = babi["scores_since_best"]
        if self.best is not None:
            self._save_best()  # an interrupted run may have written a better one after its checkpoint

    def _sequences(self) -> int:
        return self.stories

    def _close(self) -> None:
        if self.validated_step != self.step:  # a resumed run that had nothing left to train
            self._validate()

    def _results(self) -> dict:
        """The test files scored once, from best.pt: per task the error and the questions."""
        best = torch.load(self.out / BEST, map_location=self.config.device, weights_only=True)
        vocabulary = Vocabulary.from_dict(best["vocabulary"])
        model = copy.deepcopy(self.model)
        model.load_state_dict(best["model"])
        test = [encode_story(story, vocabulary) for task in sorted(self.data.test) for story in self.data.test[task]]
        score = score_stories(model, test)
        errors = score.errors()
        tasks = {str(task): {"error": error, "questions": score.questions[task]} for task, error in errors.items()}
        babi = {
            "tasks": tasks,
            "mean_error": score.mean_error(),
            "tasks_passed": sum(error < PASSED for error in errors.values()),
            "fallback": [str(task) for task in self.data.fallback],
            "train_seconds": self.train_seconds,
            "stories_per_second": self.stories / self.train_seconds if self.train_seconds > 0 else None,
            "validation_error": best["validation_error"],
            "best_step": best["step"],
        }
        return {"babi": babi}

    def _plot_curve(self, metrics: list[dict]) -> None:
        _plot_babi_curve(metrics, self.out / "learning_curve.png", self.config)

    def report(self, summary: dict) -> tuple[str, bool]:
        babi = summary["babi"]
        text = (
            f"{self.config.model} on bAbI {self.config.babi_set} tasks {self.config.babi_tasks}: "
            f"validation error {babi['validation_error']:.3f} at step {babi['best_step']} of {summary['steps']} "
            f"({summary['stopped_by']}); test error {babi['mean_error']:.3f} (mean over tasks), "
            f"{babi['tasks_passed']} of {len(babi['tasks'])} tasks passed (< {PASSED:.0%})"
        )
        return text, math.isfinite(babi["mean_error"])


def make_trainer(config: Config, resume: bool = False) -> TrainingRun:
    """The run config.task asks for; resume: a bAbI run takes its vocabulary from the checkpoint."""
    if config.task != BABI:
        return Trainer(config)
    vocabulary = None
    if resume:
        vocabulary = Vocabulary.from_dict(read_checkpoint(Path(config.out) / CHECKPOINT)["babi"]["vocabulary"])
    return BabiTrainer(config, vocabulary)


def progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        print("plots skipped: they need matplotlib (pip install matplotlib)", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_learning_curve(metrics: list[dict], path: Path, config: Config) -> None:
    plt = _pyplot()
    if plt is None or not metrics:
        return
    steps = [m["step"] for m in metrics]
    figure, (errors, levels) = plt.subplots(2, 1, figsize=(7, 5), sharex=True, height_ratios=(3, 1))
    bits = [m["bits_error"] for m in metrics]
    smooth = [sum(bits[max(0, i - 9) : i + 1]) / len(bits[max(0, i - 9) : i + 1]) for i in range(len(bits))]
    errors.plot(steps, bits, lw=0.5, alpha=0.4, color="C0")
    errors.plot(steps, smooth, lw=1.5, color="C0", label="bits in error per sequence (mean of 10 logs)")
    errors.plot(steps, [m["loss"] for m in metrics], lw=1, color="C1", label="loss (BCE per bit)")
    errors.axhline(config.threshold, color="gray", ls="--", lw=1, label=f"threshold {config.threshold}")
    # symlog: a batch with no error at all is a real value, 0, not a hole in the curve
    errors.set_yscale("symlog", linthresh=1e-2)
    errors.set_ylim(bottom=0)
    errors.legend()
    errors.set_title(f"{config.model} on {config.task}")
    levels.plot(steps, [m["top_level"] for m in metrics], lw=1, color="black")
    levels.set_ylabel("curriculum level")
    levels.set_xlabel("step")
    _save_figure(figure, path)


def _plot_babi_curve(metrics: list[dict], path: Path, config: Config) -> None:
    plt = _pyplot()
    if plt is None or not metrics:
        return
    figure, axis = plt.subplots(figsize=(7, 4))
    steps = [m["step"] for m in metrics]
    axis.plot(steps, [m["loss"] for m in metrics], lw=1, color="C1", label="loss (cross-entropy per answer word)")
    axis.plot(steps, [m["answer_error"] for m in metrics], lw=0.5, alpha=0.6, color="C0", label="training answer error")
    validated = [m for m in metrics if "validation_error" in m]
    axis.plot(
        [m["step"] for m in validated],
        [m["validation_error"] for m in validated],
        "o-",
        color="C2",
        label="validation error (questions)",
    )
    axis.axhline(PASSED, color="gray", ls="--", lw=1, label=f"passed: error < {PASSED:.0%}")
    axis.set_yscale("symlog", linthresh=1e-2)
    axis.set_ylim(bottom=0)
    axis.set_xlabel("step")
    axis.legend()
    axis.set_title(f"{config.model} on bAbI {config.babi_set}, tasks {config.babi_tasks}")
    _save_figure(figure, path)


def _save_figure(figure: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    atomic_write(path, lambda temp: figure.savefig(temp, format="png", dpi=100))
    plt.close(figure)


def _dense(weights: object, slots: int) -> Tensor:
    """The weights of the first `slots` slots as [..., slots] (a sparse memory's other slots are cut)."""
    if not hasattr(weights, "dense"):
        return weights[..., :slots]
    # Sparse memories keep (indices, weights): scatter those below `slots`, never all N.
    shown = weights.indices < slots
    return SparseWeights(weights.indices.masked_fill(~shown, 0), weights.weights * shown).dense(slots)


def plot_memory_access(model: MemoryModel, task: Task, path: Path, level: int | None = None, seed: int = 0) -> None:
    """Heatmaps over time of one sequence at `level` (default the task's max): the input, the
    output, each write head's weights [N] and each read head's weights [N]; at most PLOT_SLOTS slots
    (the lowest: an LRU fills them first) and PLOT_STEPS steps."""
    plt = _pyplot()
    if plt is None:
        return
    level = level if level is not None else task.max_level
    batch = task.sample(1, level, torch.Generator().manual_seed(seed))
    inputs = batch.inputs[:, :PLOT_STEPS].to(next(model.parameters()).device)
    N, R = min(model.memory.num_slots, PLOT_SLOTS), model.memory.num_reads
    writes, reads, outputs, state = [], [], [], None
    with scoring(model):
        for t in range(inputs.shape[1]):
            y, state = model(inputs[:, t : t + 1], state)
            outputs.append(torch.sigmoid(y[0, 0]).cpu())
            writes.append(_dense(state.write_weights, N)[0].reshape(-1, N).cpu())  # [write heads, N]
            reads.append(_dense(state.read_weights, N)[0].reshape(R, N).cpu())
    panels = [
        ("input", batch.inputs[0, :PLOT_STEPS].T),
        ("output", torch.stack(outputs, dim=1)),
    ]
    for name, weights in (("write", writes), ("read", reads)):
        panels += [
            (f"{name} weights, head {h}", torch.stack([w[h] for w in weights], 1)) for h in range(len(weights[0]))
        ]
    figure, axes = plt.subplots(len(panels), 1, figsize=(7, 1.6 * len(panels)), sharex=True)
    for axis, (title, image) in zip(axes, panels, strict=True):
        axis.imshow(image.float().numpy(), aspect="auto", interpolation="nearest", cmap="viridis")
        axis.set_title(title, fontsize=9)
    axes[-1].set_xlabel("time step")
    _save_figure(figure, path)


CHECKPOINT_KEYS = ("config", "step", "model", "optimizer", "generator", "torch_rng")
TASK_CHECKPOINT_KEYS = ("steps_to_threshold", "curriculum")
"""What an algorithmic task's checkpoint adds; a bAbI run's adds "babi"."""


def read_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    """A checkpoint that Trainer.save wrote, its tensors on `device`. ValueError naming the file
    if there is none, if it cannot be read (empty, cut short, not a torch.save file), or if it
    is something else's (another object, keys missing, a config this version does not know)."""
    if not path.is_file():
        raise ValueError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # empty, cut short, not torch's, or refused by weights_only: each its own type
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path} cannot be read as a checkpoint: {reason}") from error
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a checkpoint of sparsemem.train: it holds a {type(state).__name__}")
    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    if missing:
        raise ValueError(f"{path} is not a checkpoint of sparsemem.train: it lacks {', '.join(missing)}")
    if not isinstance(state["config"], dict):
        raise ValueError(f"{path}: its config is a {type(state['config']).__name__}, not a dict")
    fields = {field.name: field for field in dataclasses.fields(Config)}
    unknown = sorted(set(state["config"]) - set(fields))
    if unknown:
        raise ValueError(f"{path}: its config has options this version does not know: {', '.join(unknown)}")
    for name, value in state["config"].items():
        kind, choices = fields[name].type, fields[name].metadata["choices"]
        # an int fits a float field, as in Python's numbers
        fits = isinstance(value, kind) or (type(value) is int and isinstance(float(value), kind))
        if not fits or (choices is not None and value not in choices):
            expected = f"one of {', '.join(choices)}" if choices else getattr(kind, "__name__", str(kind))
            raise ValueError(f"{path}: its config's {name} is {value!r}, not {expected}")
    task_keys = ("babi",) if state["config"].get("task") == BABI else TASK_CHECKPOINT_KEYS
    missing = [key for key in task_keys if key not in state]
    if missing:
        raise ValueError(f"{path} is not a checkpoint of sparsemem.train: it lacks {', '.join(missing)}")
    return state


LR_MAX = 0.1 * torch.finfo(torch.float32).max
"""Adam's first step moves a parameter by up to lr / (1 - beta1) = 10 lr, which must be a float32."""


SCOPED_OPTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    **dict.fromkeys(
        ("data_dir", "babi_set", "babi_tasks", "babi_fallback_1k", "embedding_size", "eval_every", "patience"),
        ("task", (BABI,)),
    ),
    **dict.fromkeys(("controller", "num_slots", "word_size", "num_reads"), ("model", tuple(MODELS))),
    "k": ("model", SPARSE),
    "index": ("model", SPARSE),
    "link_k": ("model", ("sdnc",)),
    "num_writes": ("model", ("ntm",)),
    "compile": ("model", ("dnc", "ntm")),
}
"""The options only some tasks or models read: option -> (task or model, the ones that read it).
Given on the command line for another, they are refused rather than ignored (a switch turned
off, as --no-compile, is let through: it asks for what that model does anyway). Only the command
line is checked: a saved config may hold them (the kv-scale LSTM's memory sizes) and still resume."""


def check_config(config: Config) -> None:
    """ValueError naming the first option whose value cannot run (as --flag, as the command line
    spells it). Builds the task and the model (on the meta device: no memory) to ask them too,
    and creates --out to see that it can be written. The bAbI files are read later, by the
    run: a missing or malformed one is a FileNotFoundError or BabiFormatError naming it."""
    rules = (
        ("steps", config.steps >= 1, "a positive integer"),
        ("batch_size", config.batch_size >= 1, "a positive integer"),
        ("lr", 0 <= config.lr <= LR_MAX, f"a number in [0, {LR_MAX:.2g}]"),
        ("clip", config.clip > 0, "a number > 0 (inf: no clipping)"),
        ("dropout", 0 <= config.dropout < 1, "a probability in [0, 1)"),
        ("lr_half_life", config.lr_half_life is None or config.lr_half_life > 0, "a number of steps > 0"),
        ("bits", config.bits >= 1, "a positive integer"),
        ("item_length", config.item_length >= 1, "a positive integer"),
        ("max_repeats", config.max_repeats >= 1, "a positive integer"),
        ("num_writes", config.num_writes >= 1, "a positive integer"),
        ("sort_outputs", config.sort_outputs is None or config.sort_outputs >= 1, "a positive integer"),
        ("bptt", config.bptt >= 0, "an integer >= 0 (0: one update per sequence)"),
        ("threshold", config.threshold >= 0, "a number >= 0"),
        ("window", config.window >= 1, "a positive integer"),
        ("curriculum_growth", config.curriculum_growth >= 1, "a number >= 1"),
        ("curriculum_top_share", 0 <= config.curriculum_top_share <= 1, "a number in [0, 1]"),
        ("seed", -(2**63) <= config.seed < 2**64, "an integer in [-2^63, 2^64)"),
        ("checkpoint_every", config.checkpoint_every >= 1, "a positive integer"),
        ("log_every", config.log_every >= 1, "a positive integer"),
        ("threads", config.threads >= 1, "a positive integer"),
        ("time_budget", config.time_budget is None or config.time_budget > 0, "a number of minutes > 0"),
        ("embedding_size", config.embedding_size >= 1, "a positive integer"),
        ("eval_every", config.eval_every >= 1, "a positive integer"),
        ("patience", config.patience is None or config.patience >= 1, "a positive integer"),
    )
    for name, valid, expected in rules:
        if not valid:
            raise ValueError(f"{_flag(name)} must be {expected}; got {getattr(config, name)!r}")
    if config.interface_init not in INTERFACE_INITS:
        raise ValueError(f"--interface-init must be one of {list(INTERFACE_INITS)}; got {config.interface_init!r}")
    if config.interface_init != "linear" and config.model not in ("dnc", "ntm"):
        raise ValueError(
            f"--interface-init {config.interface_init} is for --model dnc or ntm; got --model {config.model}"
            + (" (sam and sdnc always start with SAMMemory.init_interface_bias)" if config.model in SPARSE else "")
        )
    check_device(config.device)
    world_size = distributed.launched_world_size()
    if config.batch_size < world_size:
        raise ValueError(
            f"--batch-size is the global batch, split over the {world_size} processes: it must be at least "
            f"{world_size}; got {config.batch_size}"
        )
    if world_size > 1 and torch.device(config.device).index is not None:
        raise ValueError(
            f"--device {config.device}: under torchrun give --device cuda (each rank takes cuda:LOCAL_RANK)"
        )
    if config.task == BABI:
        _check_babi(config)
        with torch.device("meta"):
            BabiModel(config, len(RESERVED) + 1)
    else:
        with torch.device("meta"):
            make_model(config, make_task(config))
    out = Path(config.out)
    if distributed.launched_rank() != 0:
        return  # rank 0 writes the run's files
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        raise ValueError(f"--out {out}: cannot write there ({error.strerror})") from None


def _check_babi(config: Config) -> None:
    if config.data_dir is None:
        raise ValueError(
            "--task babi needs --data-dir DIR: the bAbI release you downloaded (its root, a folder of "
            "qa*_train.txt and qa*_test.txt files, or the .tar.gz); no default place is read"
        )
    if not Path(config.data_dir).exists():
        raise ValueError(f"--data-dir {config.data_dir}: no such file or directory")
    babi_task_numbers(config.babi_tasks)
    if config.bptt:
        raise ValueError(f"--bptt is not for --task babi (one update per story); got {config.bptt}")


def check_device(name: str) -> None:
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or cuda:INDEX; got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this torch ({torch.__version__}) sees no CUDA device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")


def check_world_size(state: dict, path: Path, world_size: int) -> None:
    """ValueError unless the checkpoint `state` (read from `path`) was written by a run of
    `world_size` processes: a resume is exact only with the same rows on every rank."""
    saved = state.get("world_size", 1)  # absent from checkpoints older than data-parallel training
    if saved != world_size:

        def launch(size: int) -> str:
            return "one process (no torchrun)" if size == 1 else f"{size} processes (torchrun)"

        raise ValueError(
            f"--resume: {path} was written by a run of {launch(saved)}, and this run has {launch(world_size)}; "
            f"a resume is exact only with the same number: run it with {launch(saved)}"
        )


def resume_config(given: dict[str, Any]) -> Config:
    """The config of a --resume: the checkpoint's under --out, with the `given` options (those
    on the command line) that ON_RESUME lets change. ValueError if another one would change."""
    out = given.get("out", Config().out)
    path = Path(out) / CHECKPOINT
    state = read_checkpoint(path)
    check_world_size(state, path, distributed.launched_world_size())
    saved = Config(**state["config"])
    for name, value in given.items():
        if name not in ON_RESUME and value != getattr(saved, name):
            allowed = ", ".join(_flag(name) for name in ON_RESUME)
            raise ValueError(
                f"--resume: {_flag(name)} is {getattr(saved, name)!r} in {path}, and a resumed run keeps "
                f"its model, task and data (got {value!r}); only {allowed} may change"
            )
    return dataclasses.replace(saved, **(given | {"out": out}))  # the run goes on where it was found


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


_FLAG_TYPES: dict[Any, type] = {int | None: int, float | None: float, str | None: str}
"""The type a flag parses to, for the Config fields that may be None (a flag is never None)."""

_UNSET = object()
"""What a Config option not given on the command line parses to (argparse leaves an attribute
already in the namespace alone), so that --resume knows what was given."""


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser (bench reads its runs' options with it, as train does)."""
    parser = argparse.ArgumentParser(
        prog="python -m sparsemem.train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    aliases = {"num_slots": ["--slots"]}
    for field in dataclasses.fields(Config):
        flags = [_flag(field.name), *aliases.get(field.name, [])]
        options: dict[str, Any] = {"default": field.default, "help": field.metadata["help"]}
        if field.type is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **options)
        else:
            choices = field.metadata["choices"]
            metavar = None if choices else field.name.upper()
            kind = _FLAG_TYPES.get(field.type, field.type)
            parser.add_argument(*flags, type=kind, choices=choices, metavar=metavar, **options)
    changeable = ", ".join(_flag(name) for name in ON_RESUME)
    parser.add_argument(
        "--resume",
        action="store_true",
        help=f"continue from OUT/{CHECKPOINT}: the options not given come from it, and only {changeable} may change",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--dist-timeout",
        type=float,
        default=distributed.DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="under torchrun: how long a rank waits for the others at a collective before the run stops "
        "with an error (a rank that died or hangs); the last good checkpoint is kept",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[Config, bool, bool, float]:
    """-> (config, resume, progress, dist_timeout), the config checked (check_config; with --resume, the
    checkpoint's, changed only where ON_RESUME allows). A bad option exits with the usage and a
    message naming it (status 2), before anything trains."""
    parser = build_parser()
    unset = argparse.Namespace(**{field.name: _UNSET for field in dataclasses.fields(Config)})
    args = vars(parser.parse_args(argv, unset))
    resume, progress, dist_timeout = args.pop("resume"), not args.pop("no_progress"), args.pop("dist_timeout")
    given = {name: value for name, value in args.items() if value is not _UNSET}
    try:
        config = resume_config(given) if resume else Config(**given)
        for name, (scope, readers) in SCOPED_OPTIONS.items():
            # a switch turned off (--no-compile with --model sam) asks for nothing: it passes
            if name in given and given[name] is not False and getattr(config, scope) not in readers:
                wanted, got = " or ".join(readers), getattr(config, scope)
                raise ValueError(f"{_flag(name)} is for --{scope} {wanted}; got it with --{scope} {got}")
        check_config(config)
        if not dist_timeout > 0:
            raise ValueError(f"--dist-timeout must be a number of seconds > 0; got {dist_timeout!r}")
    except ValueError as error:
        parser.error(str(error))
    return config, resume, progress, dist_timeout


def main(argv: list[str] | None = None) -> int:
    config, resume, progress, dist_timeout = parse_args(argv)
    # Small models run fastest on one thread: each op is too small to split, and spare
    # threads only spin against other processes on a shared machine.
    torch.set_num_threads(config.threads)
    keep_freed_memory()  # a step's large tensors reuse the last step's pages (sparsemem/_malloc.py)
    world = distributed.join(config.device, dist_timeout)  # under torchrun with more than one process
    try:
        return _train(config, resume, progress, world, dist_timeout)
    finally:
        distributed.leave()


def _train(config: Config, resume: bool, progress: bool, world: World, dist_timeout: float) -> int:
    try:
        trainer = make_trainer(config, resume)
    except (FileNotFoundError, ValueError) as error:  # the bAbI files (BabiFormatError), read only now
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        summary = trainer.run(progress=progress, resume=resume)
    except TrainingDiverged as error:
        if world.writes:  # every rank stops at the same step, for the same all-reduced reason
            print(f"error: {error}", file=sys.stderr)
        world.barrier()  # torchrun ends the ranks once one fails: rank 0 says why first
        return 1
    except RuntimeError as error:
        if not world.distributed:
            raise
        # gloo and nccl raise a RuntimeError when a peer closed its connections or a collective
        # waited past the timeout: the run ends here, and no checkpoint is written after it.
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        kept = (
            f"the last good checkpoint {trainer.out / CHECKPOINT} (step {trainer.last_checkpoint}) is kept"
            if trainer.last_checkpoint is not None
            else "no checkpoint was written yet"
        )
        print(
            f"error: rank {world.rank} of {world.size} stopped after step {trainer.step}: {reason}\n"
            f"Another rank has likely died or hung (no answer within --dist-timeout {dist_timeout:g} s; see its "
            f"log); {kept}: resume from it with --resume and the same number of processes",
            file=sys.stderr,
        )
        return 1
    if not world.writes:
        return 0
    text, finite = trainer.report(summary)
    print(text)
    print(f"wrote {config.out}/: {', '.join(trainer.outputs)}")
    return 0 if finite else 1


if __name__ == "__main__":
    sys.exit(main())
