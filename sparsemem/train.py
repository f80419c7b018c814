"""Train a memory model on an algorithmic task.

    python -m sparsemem.train --model dnc --task copy --steps 2000 --out runs/dnc-copy
    python -m sparsemem.train --model sam --task associative-recall --slots 1048576 --device cuda
    python -m sparsemem.train --model sam --task key-value-recall --bptt 64 --slots 1048576 --device cuda

Writes to --out: metrics.jsonl (one JSON object per logged step), checkpoint.pt (every
--checkpoint-every steps and at the end, written atomically; --resume continues from it
bit-exactly: model, optimizer, RNG and curriculum), summary.json, and the PNG plots
learning_curve.png and memory_access.png. A NaN or inf loss, gradient, parameter or optimizer
state stops training with exit status 1 before anything is saved, so the last good checkpoint
stays in place. --resume takes the options not given from the checkpoint and refuses to change
the model, the task or the data (ON_RESUME lists what may change). --time-budget stops training
after so many minutes of it, across resumes. Every metrics line and summary.json report the
throughput (sequences_per_second).
"""

import argparse
import dataclasses
import json
import math
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sparsemem.index import INDEXES
from sparsemem.memory import SparseWeights
from sparsemem.models import DNC, NTM, SAM, SDNC, MemoryModel
from sparsemem.tasks import (
    TASKS,
    AssociativeRecall,
    Batch,
    Curriculum,
    KeyValueRecall,
    Task,
    bits_in_error,
    sequence_loss,
)

MODELS: dict[str, type[MemoryModel]] = {"dnc": DNC, "ntm": NTM, "sam": SAM, "sdnc": SDNC}
"""The models by their command-line name; each takes (input_size, hidden_size, num_slots=N,
word_size=W, num_reads=R, output_size=...); sam and sdnc also k and index, sdnc link_k."""

SPARSE = ("sam", "sdnc")

CONTROLLERS = ("lstm", "feedforward")
"""--controller: an LSTM cell (the default), or Linear + tanh with no state of its own."""

PLOT_SLOTS, PLOT_STEPS = 256, 200
"""The memory access plot shows at most these many slots and time steps."""

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"


def _option(default: Any, help: str, choices: Iterable[str] | None = None) -> Any:
    """A Config field: its default, its --help text and, for names, the values it takes."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclasses.dataclass
class Config:
    """Everything a run depends on; the command-line flags are these fields (--help says what
    each one does)."""

    model: str = _option("dnc", "the model; sam and sdnc are the sparse ones", tuple(MODELS))
    task: str = _option("copy", "the algorithmic task", tuple(TASKS))
    steps: int = _option(2000, "train to this many steps (batches) in all, counting those before a --resume")
    batch_size: int = _option(16, "sequences per batch (B)")
    lr: float = _option(3e-3, "Adam's learning rate")
    clip: float = _option(10.0, "clip the gradient's global norm to this (inf: no clipping)")
    controller: str = _option(
        "lstm", "an LSTM cell, or Linear + tanh (feedforward: only the memory crosses time steps)", CONTROLLERS
    )
    hidden_size: int = _option(64, "the controller's hidden size")
    num_slots: int = _option(16, "memory slots (N)")
    word_size: int = _option(16, "memory word size (W)")
    num_reads: int = _option(1, "read heads (R)")
    k: int = _option(8, "sam, sdnc: slots read per head (K)")
    index: str = _option("exact", "sam, sdnc: the nearest-neighbour index", INDEXES)
    link_k: int = _option(8, "sdnc: link entries kept per row (K_L)")
    bits: int = _option(8, "bits per vector of the task")
    item_length: int = _option(3, "associative-recall: vectors per item")
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
    stop_at_threshold: bool = _option(True, "stop once the highest level is mastered")
    seed: int = _option(0, "seeds the parameters and the data")
    device: str = _option("cpu", "cpu, cuda or cuda:INDEX")
    out: str = _option("runs/train", "the run's directory: metrics, checkpoint, summary, plots")
    checkpoint_every: int = _option(500, "write the checkpoint every this many steps (and at the end)")
    log_every: int = _option(10, "log the metrics every this many steps")
    threads: int = _option(1, "torch's CPU threads (small models run fastest on one)")
    time_budget: float | None = _option(
        None,
        "stop training (checkpoint, summary) after this many minutes of it in all, counting those "
        "before a --resume; None: no limit",
    )


ON_RESUME = (
    "steps",
    "lr",
    "clip",
    "checkpoint_every",
    "log_every",
    "threads",
    "time_budget",
    "stop_at_threshold",
    "device",
    "out",
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
    if task_cls is KeyValueRecall:
        options = ("key_bits", "query_every", "recent", "final_queries")
        return task_cls(config.bits, min_level, max_level, **{name: getattr(config, name) for name in options})
    return task_cls(config.bits, min_level, max_level)


def make_model(config: Config, task: Task) -> MemoryModel:
    if config.model not in MODELS:
        raise ValueError(f"unknown model {config.model!r}; expected one of {sorted(MODELS)}")
    if config.controller not in CONTROLLERS:
        raise ValueError(f"unknown controller {config.controller!r}; expected one of {CONTROLLERS}")
    controller = None
    if config.controller == "feedforward":
        # Nothing crosses time steps but the memory: the DNC paper's feed-forward controller.
        controller_in = task.input_size + config.num_reads * config.word_size
        controller = nn.Sequential(nn.Linear(controller_in, config.hidden_size), nn.Tanh())
    sparse = {"k": config.k, "index": config.index} if config.model in SPARSE else {}
    if config.model == "sdnc":
        sparse["link_k"] = config.link_k
    return MODELS[config.model](
        task.input_size,
        config.hidden_size,
        num_slots=config.num_slots,
        word_size=config.word_size,
        num_reads=config.num_reads,
        output_size=task.output_size,
        controller=controller,
        **sparse,
    )


def evaluate(model: MemoryModel, task: Task, batch_size: int = 32, seed: int = 1234) -> dict[int, float]:
    """Bits in error per sequence at every level, on held-out batches fixed by `seed`."""
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    errors = {}
    with torch.no_grad():
        for level in task.eval_levels():
            batch = _to(task.sample(batch_size, level, generator), device)
            logits, _ = model(batch.inputs)
            errors[level] = float(bits_in_error(logits, batch))
    return errors


def final_query_error(
    model: MemoryModel, task: KeyValueRecall, level: int, batch_size: int = 32, seed: int = 1234
) -> float:
    """The fraction of value bits in error over the final queries of key-value-recall episodes of
    `level` pairs (queries about any pair of the episode), on held-out batches fixed by `seed`."""
    batch = _to(task.sample(batch_size, level, torch.Generator().manual_seed(seed)), next(model.parameters()).device)
    with torch.no_grad():
        logits, _ = model(batch.inputs)
    final = slice(batch.inputs.shape[1] - task.final_queries, None)
    return float(((logits[:, final] > 0) != (batch.targets[:, final] > 0.5)).float().mean())


def peak_memory_bytes(device: torch.device | str) -> int:
    """The most memory this process has held: allocated GPU memory on CUDA, resident set on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _to(batch: Batch, device: torch.device | str) -> Batch:
    return Batch(batch.inputs.to(device), batch.targets.to(device), batch.mask.to(device))


def _atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """write(temp_path), flushed to the disk, then renamed over `path`: a reader never sees a
    half-written file, and after a power loss `path` holds the old file or the new one, whole."""
    temp = path.with_name(f".{path.name}.tmp")
    write(temp)
    _fsync(temp)
    os.replace(temp, path)
    _fsync(path.parent)  # the rename itself


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _all_finite(tensors: Iterable[Tensor], device: torch.device) -> Tensor:
    """Whether the floating-point tensors on `device` hold only finite values: a bool tensor on
    that device, so asking costs no host sync (Adam's step counters stay on the CPU: skipped).
    One float64 sum per tensor, a third of the time of isfinite().all(); it cannot overflow on
    float32 values, so it is non-finite exactly when an element is."""
    sums = [t.sum(dtype=torch.float64) for t in tensors if t.is_floating_point() and t.device == device]
    return torch.stack(sums).sum().isfinite() if sums else torch.ones((), dtype=torch.bool, device=device)


class Trainer:
    """One training run: model, optimizer, data generator and curriculum, checkpointed together.

    model: train this model instead of the one the config names (it must fit the task's
    input and output sizes). Data come from a torch.Generator seeded by config.seed, so a
    run is a function of its config. The config is taken as it is; `check_config` is what
    the command line runs on it first.
    """

    def __init__(self, config: Config, model: MemoryModel | None = None) -> None:
        self.config = config
        self.out = Path(config.out)
        self.task = make_task(config)
        torch.manual_seed(config.seed)
        self.model = (model if model is not None else make_model(config, self.task)).to(config.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.curriculum = Curriculum(
            self.task.min_level, self.task.max_level, config.threshold, config.window, enabled=config.curriculum
        )
        self.step = 0
        self.steps_to_threshold: int | None = None
        self.last_checkpoint: int | None = None
        self.train_seconds = 0.0
        """Wall time spent in the training loop so far, over all the runs this one resumes."""

    def train_step(self) -> dict:
        """One batch: forward, loss, backward, clipped update (one per `bptt` time steps with
        bptt, the state carried on detached). -> this step's metrics."""
        started = time.perf_counter()
        level = self.curriculum.draw(self.generator)
        sampled = self.task.sample(self.config.batch_size, level, self.generator)
        batch = _to(sampled, self.config.device)
        length = batch.inputs.shape[1]
        window = self.config.bptt or length
        state, outputs, losses, grad_norms = None, [], [], []
        for start in range(0, length, window):
            part = Batch(*(field[:, start : start + window] for field in (batch.inputs, batch.targets, batch.mask)))
            logits, state = self.model(part.inputs, state)
            outputs.append(logits.detach())
            scored = int(sampled.mask[:, start : start + window].sum())  # on the host: no device sync
            if scored:
                loss, norm = self._update(logits, part)
                losses.append((loss * scored, scored))
                grad_norms.append(norm)
            state = state.detach()
        logits = torch.cat(outputs, dim=1)
        loss = sum(total for total, _ in losses) / max(1, sum(count for _, count in losses))
        grad_norm = max(grad_norms, default=0.0)
        self.step += 1
        bits_error = float(bits_in_error(logits, batch))
        self.curriculum.update(level, bits_error)
        if self.steps_to_threshold is None and self.curriculum.mastered:
            self.steps_to_threshold = self.step
        # the updates' reads and float(bits_error) waited for the device: the time is the step's, not its launch's
        seconds = time.perf_counter() - started
        return {
            "step": self.step,
            "loss": loss,
            "bits_error": bits_error,
            "level": level,
            "top_level": self.curriculum.level,
            "grad_norm": grad_norm,
            "step_seconds": seconds,
            "sequences_per_second": self.config.batch_size / seconds,
            "peak_memory_mb": peak_memory_bytes(self.config.device) / 2**20,
        }

    def _update(self, logits: Tensor, batch: Batch) -> tuple[float, float]:
        """Loss on the scored steps, backward, clipped optimizer step -> (loss, gradient norm).

        Raises TrainingDiverged if the loss, the gradient norm, a parameter or the optimizer
        state is NaN or inf. All four come from the device in one read, the update's only host
        sync; a bad update is not undone, but nothing is saved after it."""
        loss = sequence_loss(logits, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip)
        self.optimizer.step()
        device = loss.device
        optimizer_state = (t for state in self.optimizer.state.values() for t in state.values() if torch.is_tensor(t))
        checks = [
            loss.detach(),
            grad_norm.to(device),
            _all_finite(self.model.parameters(), device),
            _all_finite(optimizer_state, device),
        ]
        loss_value, norm, parameters_finite, state_finite = torch.stack([c.to(loss.dtype) for c in checks]).tolist()
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
        return {
            "config": dataclasses.asdict(self.config),
            "step": self.step,
            "steps_to_threshold": self.steps_to_threshold,
            "train_seconds": self.train_seconds,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "curriculum": self.curriculum.state_dict(),
        }

    def save(self) -> Path:
        """Write out/checkpoint.pt atomically (temp file, fsync, rename)."""
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / CHECKPOINT
        state = self.state_dict()
        _atomic_write(path, lambda temp: torch.save(state, temp))
        self.last_checkpoint = self.step
        return path

    def load(self, path: Path | str | None = None) -> None:
        """Continue from a checkpoint (default out/checkpoint.pt) exactly where it was written,
        with this trainer's config's learning rate (a --resume may have changed it)."""
        path = Path(path) if path is not None else self.out / CHECKPOINT
        state = read_checkpoint(path, self.config.device)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.curriculum.load_state_dict(state["curriculum"])
        self.step = state["step"]
        self.steps_to_threshold = state["steps_to_threshold"]
        self.train_seconds = state.get("train_seconds", 0.0)  # absent from checkpoints older than --time-budget
        self.last_checkpoint = self.step

    def run(self, progress: bool = True, resume: bool = False) -> dict:
        """Train to config.steps (or until the task is mastered, or the time budget is spent),
        logging, checkpointing and plotting under config.out. -> the summary, also written to
        summary.json."""
        self.out.mkdir(parents=True, exist_ok=True)
        if resume:
            self.load()
        metrics = self._metrics_since_checkpoint()
        started = time.perf_counter()
        clock = started - self.train_seconds  # so that train_seconds counts on from the checkpoint's
        bar = _progress(self.config.steps, self.step, enabled=progress)
        try:
            with open(self.out / METRICS, "a") as log:
                while (stopped_by := self._stopped_by()) is None:
                    record = self.train_step()
                    self.train_seconds = time.perf_counter() - clock
                    bar.update(1)
                    if self.step % self.config.log_every == 0 or self._done():
                        metrics.append(record)
                        log.write(json.dumps(record) + "\n")
                        log.flush()
                        bar.set_postfix(
                            loss=f"{record['loss']:.4f}",
                            bits_error=f"{record['bits_error']:.3f}",
                            level=record["top_level"],
                            step=f"{1000 * record['step_seconds']:.1f}ms",
                            peak=f"{record['peak_memory_mb']:.0f}MiB",
                        )
                    if self.step % self.config.checkpoint_every == 0:
                        os.fsync(log.fileno())  # the log up to a checkpoint is on the disk before it
                        self.save()
                os.fsync(log.fileno())  # and before the last one
        finally:
            bar.close()
            _plot_learning_curve(metrics, self.out / "learning_curve.png", self.config)
        self.save()
        sequences = self.step * self.config.batch_size
        summary = {
            "config": dataclasses.asdict(self.config),
            "steps": self.step,
            "steps_to_threshold": self.steps_to_threshold,
            "stopped_by": stopped_by,
            "train_seconds": self.train_seconds,
            "sequences_per_second": sequences / self.train_seconds if self.train_seconds > 0 else None,
            "eval_bits_error": evaluate(self.model, self.task),
            "seconds": time.perf_counter() - started,
        }
        if isinstance(self.task, KeyValueRecall):
            levels = self.task.eval_levels()
            summary["final_query_error"] = {level: final_query_error(self.model, self.task, level) for level in levels}
        _atomic_write(self.out / SUMMARY, lambda temp: temp.write_text(json.dumps(summary, indent=2)))
        plot_memory_access(self.model, self.task, self.out / "memory_access.png")
        return summary

    def _done(self) -> bool:
        return self.config.stop_at_threshold and self.steps_to_threshold is not None

    def _stopped_by(self) -> str | None:
        """Why training stops now: "steps", "threshold" or "time_budget"; None: it goes on."""
        if self.step >= self.config.steps:
            return "steps"
        if self._done():
            return "threshold"
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
        _atomic_write(path, lambda temp: temp.write_text("".join(json.dumps(r) + "\n" for r in records)))
        return records


def _progress(total: int, initial: int, enabled: bool):
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
    figure.tight_layout()
    _atomic_write(path, lambda temp: figure.savefig(temp, format="png", dpi=100))
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
    output, the write weights [N] and each read head's weights [N]; at most PLOT_SLOTS slots
    (the lowest: an LRU fills them first) and PLOT_STEPS steps."""
    plt = _pyplot()
    if plt is None:
        return
    level = level if level is not None else task.max_level
    batch = task.sample(1, level, torch.Generator().manual_seed(seed))
    inputs = batch.inputs[:, :PLOT_STEPS].to(next(model.parameters()).device)
    N, R = min(model.memory.num_slots, PLOT_SLOTS), model.memory.num_reads
    writes, reads, outputs, state = [], [], [], None
    with torch.no_grad():
        for t in range(inputs.shape[1]):
            y, state = model(inputs[:, t : t + 1], state)
            outputs.append(torch.sigmoid(y[0, 0]).cpu())
            writes.append(_dense(state.write_weights, N)[0].reshape(-1, N)[0].cpu())
            reads.append(_dense(state.read_weights, N)[0].reshape(R, N).cpu())
    panels = [
        ("input", batch.inputs[0, :PLOT_STEPS].T),
        ("output", torch.stack(outputs, dim=1)),
        ("write weights", torch.stack(writes, dim=1)),
    ]
    panels += [(f"read weights, head {r}", torch.stack([w[r] for w in reads], dim=1)) for r in range(R)]
    figure, axes = plt.subplots(len(panels), 1, figsize=(7, 1.6 * len(panels)), sharex=True)
    for axis, (title, image) in zip(axes, panels, strict=True):
        axis.imshow(image.float().numpy(), aspect="auto", interpolation="nearest", cmap="viridis")
        axis.set_title(title, fontsize=9)
    axes[-1].set_xlabel("time step")
    figure.tight_layout()
    _atomic_write(path, lambda temp: figure.savefig(temp, format="png", dpi=100))
    plt.close(figure)


CHECKPOINT_KEYS = ("config", "step", "steps_to_threshold", "model", "optimizer", "generator", "torch_rng", "curriculum")


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
    return state


LR_MAX = 0.1 * torch.finfo(torch.float32).max
"""Adam's first step moves a parameter by up to lr / (1 - beta1) = 10 lr, which must be a float32."""


def check_config(config: Config) -> None:
    """ValueError naming the first option whose value cannot run (as --flag, as the command line
    spells it). Builds the task and the model (on the meta device: no memory) to ask them too,
    and creates --out to see that it can be written."""
    rules = (
        ("steps", config.steps >= 1, "a positive integer"),
        ("batch_size", config.batch_size >= 1, "a positive integer"),
        ("lr", 0 <= config.lr <= LR_MAX, f"a number in [0, {LR_MAX:.2g}]"),
        ("clip", config.clip > 0, "a number > 0 (inf: no clipping)"),
        ("bits", config.bits >= 1, "a positive integer"),
        ("item_length", config.item_length >= 1, "a positive integer"),
        ("bptt", config.bptt >= 0, "an integer >= 0 (0: one update per sequence)"),
        ("threshold", config.threshold >= 0, "a number >= 0"),
        ("window", config.window >= 1, "a positive integer"),
        ("seed", -(2**63) <= config.seed < 2**64, "an integer in [-2^63, 2^64)"),
        ("checkpoint_every", config.checkpoint_every >= 1, "a positive integer"),
        ("log_every", config.log_every >= 1, "a positive integer"),
        ("threads", config.threads >= 1, "a positive integer"),
        ("time_budget", config.time_budget is None or config.time_budget > 0, "a number of minutes > 0"),
    )
    for name, valid, expected in rules:
        if not valid:
            raise ValueError(f"{_flag(name)} must be {expected}; got {getattr(config, name)!r}")
    _check_device(config.device)
    with torch.device("meta"):
        make_model(config, make_task(config))
    out = Path(config.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        raise ValueError(f"--out {out}: cannot write there ({error.strerror})") from None


def _check_device(name: str) -> None:
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


def resume_config(given: dict[str, Any]) -> Config:
    """The config of a --resume: the checkpoint's under --out, with the `given` options (those
    on the command line) that ON_RESUME lets change. ValueError if another one would change."""
    out = given.get("out", Config().out)
    path = Path(out) / CHECKPOINT
    saved = Config(**read_checkpoint(path)["config"])
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


_FLAG_TYPES: dict[Any, type] = {int | None: int, float | None: float}
"""The type a flag parses to, for the Config fields that may be None (a flag is never None)."""

_UNSET = object()
"""What a Config option not given on the command line parses to (argparse leaves an attribute
already in the namespace alone), so that --resume knows what was given."""


def _parser() -> argparse.ArgumentParser:
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
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[Config, bool, bool]:
    """-> (config, resume, progress), the config checked (check_config; with --resume, the
    checkpoint's, changed only where ON_RESUME allows). A bad option exits with the usage and a
    message naming it (status 2), before anything trains."""
    parser = _parser()
    unset = argparse.Namespace(**{field.name: _UNSET for field in dataclasses.fields(Config)})
    args = vars(parser.parse_args(argv, unset))
    resume, progress = args.pop("resume"), not args.pop("no_progress")
    given = {name: value for name, value in args.items() if value is not _UNSET}
    try:
        config = resume_config(given) if resume else Config(**given)
        check_config(config)
    except ValueError as error:
        parser.error(str(error))
    return config, resume, progress


def main(argv: list[str] | None = None) -> int:
    config, resume, progress = parse_args(argv)
    # Small models run fastest on one thread: each op is too small to split, and spare
    # threads only spin against other processes on a shared machine.
    torch.set_num_threads(config.threads)
    trainer = Trainer(config)
    try:
        summary = trainer.run(progress=progress, resume=resume)
    except TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    reached = summary["steps_to_threshold"]
    verdict = f"mastered after {reached} steps" if reached is not None else "threshold not reached"
    if summary["stopped_by"] == "time_budget":
        verdict += f" (time budget spent at step {summary['steps']})"
    worst = max(summary["eval_bits_error"].values())
    print(f"{config.model} on {config.task}: {verdict}; held-out bits error per sequence <= {worst:.3f} at every level")
    print(f"wrote {config.out}/: {METRICS}, {CHECKPOINT}, {SUMMARY}, learning_curve.png, memory_access.png")
    return 0 if math.isfinite(worst) else 1


if __name__ == "__main__":
    sys.exit(main())
