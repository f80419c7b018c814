"""Train a memory model on an algorithmic task.

    python -m sparsemem.train --model dnc --task copy --steps 2000 --out runs/dnc-copy
    python -m sparsemem.train --model sam --task associative-recall --slots 1048576 --device cuda
    python -m sparsemem.train --model sam --task key-value-recall --bptt 64 --slots 1048576 --device cuda

Writes to --out: metrics.jsonl (one JSON object per logged step), checkpoint.pt (every
--checkpoint-every steps and at the end, written atomically; --resume continues from it
bit-exactly: model, optimizer, RNG and curriculum), summary.json, and the PNG plots
learning_curve.png and memory_access.png. A NaN or inf loss or gradient stops training
with exit status 1 and leaves the last good checkpoint in place.
"""

import argparse
import dataclasses
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

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


@dataclasses.dataclass
class Config:
    """Everything a run depends on; the command-line flags are these fields.

    controller: "lstm" or "feedforward" (CONTROLLERS). min_level, max_level: the task's
    difficulty range (sequence length, or items for associative recall; None: the task's
    default). item_length: vectors per item in associative recall. threshold: bits in
    error per sequence, averaged over the last `window` batches at the top level, that
    advance the curriculum and count as mastered. k, index: SAM and SDNC's slots read per
    head and nearest-neighbour index; link_k: SDNC's link entries per row (K_L).
    bptt: truncated backpropagation through time, an update every `bptt` time steps with the
    state carried on, detached (0: one update per sequence). key_bits, query_every, recent,
    final_queries: the key-value-recall task's (see KeyValueRecall).
    """

    model: str = "dnc"
    task: str = "copy"
    steps: int = 2000
    batch_size: int = 16
    lr: float = 3e-3
    clip: float = 10.0
    controller: str = "lstm"
    hidden_size: int = 64
    num_slots: int = 16
    word_size: int = 16
    num_reads: int = 1
    k: int = 8
    index: str = "exact"
    link_k: int = 8
    bits: int = 8
    item_length: int = 3
    key_bits: int = 32
    query_every: int = 4
    recent: int = 16
    final_queries: int = 16
    bptt: int = 0
    min_level: int | None = None
    max_level: int | None = None
    curriculum: bool = True
    threshold: float = 0.1
    window: int = 20
    stop_at_threshold: bool = True
    seed: int = 0
    device: str = "cpu"
    out: str = "runs/train"
    checkpoint_every: int = 500
    log_every: int = 10
    threads: int = 1


class TrainingDiverged(RuntimeError):
    """A NaN or inf loss or gradient: training stopped, the last good checkpoint is kept."""


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


def _atomic_write(path: Path, write) -> None:
    """write(temp_path), then rename over `path`: a reader never sees a half-written file."""
    temp = path.with_name(f".{path.name}.tmp")
    write(temp)
    os.replace(temp, path)


class Trainer:
    """One training run: model, optimizer, data generator and curriculum, checkpointed together.

    model: train this model instead of the one the config names (it must fit the task's
    input and output sizes). Data come from a torch.Generator seeded by config.seed, so a
    run is a function of its config.
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
                losses.append((float(loss.detach()) * scored, scored))
                grad_norms.append(float(norm))
            state = state.detach()
        logits = torch.cat(outputs, dim=1)
        loss = sum(total for total, _ in losses) / max(1, sum(count for _, count in losses))
        grad_norm = max(grad_norms, default=0.0)
        self.step += 1
        bits_error = float(bits_in_error(logits, batch))
        self.curriculum.update(level, bits_error)
        if self.steps_to_threshold is None and self.curriculum.mastered:
            self.steps_to_threshold = self.step
        return {
            "step": self.step,
            "loss": loss,
            "bits_error": bits_error,
            "level": level,
            "top_level": self.curriculum.level,
            "grad_norm": grad_norm,
            # float(loss) above waited for the device: the time is the step's, not its launch's
            "step_seconds": time.perf_counter() - started,
            "peak_memory_mb": peak_memory_bytes(self.config.device) / 2**20,
        }

    def _update(self, logits: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        """Loss on the scored steps, backward, clipped optimizer step -> (loss, gradient norm)."""
        loss = sequence_loss(logits, batch)
        self._check_finite("loss", loss)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip)
        self._check_finite("gradient norm", grad_norm)
        self.optimizer.step()
        return loss, grad_norm

    def _check_finite(self, what: str, value: Tensor) -> None:
        if not bool(torch.isfinite(value)):
            kept = (
                f"the last good checkpoint {self.out / CHECKPOINT} (step {self.last_checkpoint}) is kept; "
                "resume from it with --resume, perhaps with a lower --lr or --clip"
                if self.last_checkpoint is not None
                else "no checkpoint was written yet"
            )
            number = float(value.detach())
            raise TrainingDiverged(f"{what} is {number} at step {self.step + 1}: training stopped; {kept}")

    def state_dict(self) -> dict:
        return {
            "config": dataclasses.asdict(self.config),
            "step": self.step,
            "steps_to_threshold": self.steps_to_threshold,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "curriculum": self.curriculum.state_dict(),
        }

    def save(self) -> Path:
        """Write out/checkpoint.pt atomically (temp file + rename)."""
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / CHECKPOINT
        state = self.state_dict()
        _atomic_write(path, lambda temp: torch.save(state, temp))
        self.last_checkpoint = self.step
        return path

    def load(self, path: Path | str | None = None) -> None:
        """Continue from a checkpoint (default out/checkpoint.pt) exactly where it was written."""
        path = Path(path) if path is not None else self.out / CHECKPOINT
        state = torch.load(path, map_location=self.config.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.curriculum.load_state_dict(state["curriculum"])
        self.step = state["step"]
        self.steps_to_threshold = state["steps_to_threshold"]
        self.last_checkpoint = self.step

    def run(self, progress: bool = True, resume: bool = False) -> dict:
        """Train to config.steps (or until the task is mastered), logging, checkpointing and
        plotting under config.out. -> the summary, also written to summary.json."""
        self.out.mkdir(parents=True, exist_ok=True)
        if resume:
            self.load()
        metrics = self._metrics_since_checkpoint()
        started = time.perf_counter()
        bar = _progress(self.config.steps, self.step, enabled=progress)
        try:
            with open(self.out / METRICS, "a") as log:
                while self.step < self.config.steps and not self._done():
                    record = self.train_step()
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
                        self.save()
        finally:
            bar.close()
            _plot_learning_curve(metrics, self.out / "learning_curve.png", self.config)
        self.save()
        summary = {
            "config": dataclasses.asdict(self.config),
            "steps": self.step,
            "steps_to_threshold": self.steps_to_threshold,
            "eval_bits_error": evaluate(self.model, self.task),
            "seconds": time.perf_counter() - started,
        }
        if isinstance(self.task, KeyValueRecall):
            levels = self.task.eval_levels()
            summary["final_query_error"] = {level: final_query_error(self.model, self.task, level) for level in levels}
        _atomic_write(self.out / "summary.json", lambda temp: temp.write_text(json.dumps(summary, indent=2)))
        plot_memory_access(self.model, self.task, self.out / "memory_access.png")
        return summary

    def _done(self) -> bool:
        return self.config.stop_at_threshold and self.steps_to_threshold is not None

    def _metrics_since_checkpoint(self) -> list[dict]:
        """The logged metrics up to this run's step; lines an interrupted run logged past its
        last checkpoint are dropped, so a resumed log reads as one uninterrupted run."""
        path = self.out / METRICS
        if not path.exists():
            return []
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
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


def parse_args(argv: list[str] | None = None) -> tuple[Config, bool, bool]:
    parser = argparse.ArgumentParser(prog="python -m sparsemem.train", description=__doc__.split("\n\n")[0])
    defaults = Config()
    aliases = {"num_slots": ["--slots"]}
    for field in dataclasses.fields(Config):
        flags = ["--" + field.name.replace("_", "-"), *aliases.get(field.name, [])]
        default = getattr(defaults, field.name)
        if isinstance(default, bool):
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, default=default)
        else:
            kind = int if field.name in ("min_level", "max_level") else type(default)
            parser.add_argument(*flags, type=kind, default=default, metavar=field.name.upper())
    parser.add_argument("--resume", action="store_true", help=f"continue from OUT/{CHECKPOINT}")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = vars(parser.parse_args(argv))
    resume, no_progress = args.pop("resume"), args.pop("no_progress")
    return Config(**args), resume, not no_progress


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
    worst = max(summary["eval_bits_error"].values())
    print(f"{config.model} on {config.task}: {verdict}; held-out bits error per sequence <= {worst:.3f} at every level")
    print(f"wrote {config.out}/: {METRICS}, {CHECKPOINT}, summary.json, learning_curve.png, memory_access.png")
    return 0 if math.isfinite(worst) else 1


if __name__ == "__main__":
    sys.exit(main())
