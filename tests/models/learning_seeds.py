"""The learning tests' runs on several seeds, one after another, as a table (the tests train one:
tests/models/test_learning.py's SEED). Each row: the run, the seed, steps to threshold (learning
runs), the held-out error (bits in error per sequence; the sparse recall test: its loss), whether
the test's assertion holds, and the CPU seconds.

    nice python -m tests.models.learning_seeds                  # seeds 0-4, every run
    nice python -m tests.models.learning_seeds --seeds 0 3 -k recall
"""

import argparse
import tempfile
import time

import torch

from tests.models import test_learning as dense
from tests.models import test_sparse_learning as sparse


def _task_run(model: str, config: dict, ablate: bool, bound: float = 10 * dense.THRESHOLD):
    """bound: the held-out error the ablation must stay above (the tests' assertion)."""

    def run(seed: int) -> tuple[int | None, float, bool]:
        options = config | {"model": model, "seed": seed}
        with tempfile.TemporaryDirectory() as out:
            trainer, error, _ = dense.train(out, ablate=ablate, **options)
        if ablate:
            return None, error, error > bound
        reached = trainer.steps_to_threshold
        return reached, error, reached is not None and error < dense.THRESHOLD

    return run


def _sparse_recall(ablate: bool):
    def run(seed: int) -> tuple[int | None, float, bool]:
        if ablate:
            loss = sparse.train(zero_reads=True, iterations=sparse.ABLATION_ITERATIONS, seed=seed)
            return None, loss, loss > sparse.CHANCE
        loss = sparse.train(zero_reads=False, iterations=sparse.RECALL_ITERATIONS, seed=seed)
        return None, loss, loss < sparse.LEARNED

    return run


RUNS = {
    **{
        f"{model} copy{', reads zeroed' if ablate else ''}": _task_run(model, dense.COPY | options, ablate)
        for model, options in dense.COPY_MODEL.items()
        for ablate in (False, True)
    },
    **{
        f"{model} recall{', reads zeroed' if ablate else ''}": _task_run(
            model, dense.RECALL | options | (dense.RECALL_ABLATION if ablate else {}), ablate, dense.CHANCE
        )
        for model, options in dense.RECALL_MODEL.items()
        for ablate in (False, True)
    },
    "sam recall (loss)": _sparse_recall(False),
    "sam recall, reads zeroed (loss)": _sparse_recall(True),
    **{
        f"{model} copy{', reads zeroed' if ablate else ''}": _task_run(model, sparse.COPY | options, ablate)
        for model, options in sparse.COPY_MODEL.items()
        for ablate in (False, True)
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("-k", nargs="+", default=[""], help="only the runs whose name contains one of these")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| run | seed | steps to threshold | held-out error | passes | CPU s |")
    print("|---|---:|---:|---:|---|---:|")
    for name, run in RUNS.items():
        if not any(part in name for part in args.k):
            continue
        for seed in args.seeds:
            started = time.process_time()
            reached, error, passes = run(seed)
            seconds = time.process_time() - started
            steps = "-" if reached is None else str(reached)
            print(
                f"| {name} | {seed} | {steps} | {error:.3f} | {'yes' if passes else 'NO'} | {seconds:.1f} |", flush=True
            )


if __name__ == "__main__":
    main()
