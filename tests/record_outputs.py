"""Record the outputs and gradients of every public op and of an NTM, DNC, SAM and SDNC step,
then compare a later tree against the recording bit for bit: the proof that a reorganisation
changed no behaviour.

    python -m tests.record_outputs record before.pt    # at the old commit
    python -m tests.record_outputs compare before.pt   # after the change: exit 1 on any difference

Only public names are used (sm.ops.*, sm.NTM/DNC/SAM/SDNC, sparsemem.testing.op_inputs), so the
same script runs on both sides of a change that moves internals. Each backend that runs on the
CPU here is recorded (SPARSEMEM_BACKEND, with TRITON_INTERPRET=1 for triton).
"""

import argparse
import os
import sys

import torch

import sparsemem as sm
from sparsemem.testing import OPS, op_inputs

BACKENDS = ("torch", "cpp", "triton")
DTYPES = (torch.float32, torch.float64)
MODELS = {"ntm": sm.NTM, "dnc": sm.DNC, "sam": sm.SAM, "sdnc": sm.SDNC}


def _op_case(op: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    inputs = op_inputs(op, dtype, B=3, N=7, W=5, R=3)
    inputs = tuple(x.requires_grad_() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs)
    outputs = getattr(sm.ops, op)(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    record = {f"out{i}": out.detach() for i, out in enumerate(outputs)}
    floats = [out for out in outputs if out.is_floating_point()]
    g = torch.Generator().manual_seed(1)
    loss = sum((out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum() for out in floats)
    differentiable = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    grads = torch.autograd.grad(loss, differentiable, allow_unused=True)
    record |= {f"grad{i}": grad for i, grad in enumerate(grads) if grad is not None}
    return record


def _model_case(name: str, dtype: torch.dtype, index: str, preload: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    sizes = {"num_slots": 13, "word_size": 6, "num_reads": 3}
    if name in ("sam", "sdnc"):
        sizes |= {"k": 4, "index": index}
    model = MODELS[name](5, 16, output_size=7, **sizes).to(dtype)
    x = torch.randn(3, 9, 5, dtype=dtype)
    memory = torch.randn(13, 6, dtype=dtype, requires_grad=True) if preload else None
    state = model.init_state(3, memory=memory) if preload else None
    y, state = model(x, state)
    y2, _ = model(torch.randn(3, 4, 5, dtype=dtype), state.detach())
    (y.square().sum() + y2.sum()).backward()
    record = {"y": y.detach(), "y2": y2.detach(), "reads": state.reads.detach()}
    record |= {f"grad.{n}": p.grad for n, p in model.named_parameters()}
    if preload:
        record["grad.memory"] = memory.grad
    return record


def record_all() -> dict[str, torch.Tensor]:
    results: dict[str, torch.Tensor] = {}
    for backend in BACKENDS:
        os.environ["SPARSEMEM_BACKEND"] = backend
        if sm._backends.availability()[backend] is not None:
            print(f"skip {backend}: {sm._backends.availability()[backend]}")
            continue
        for dtype in DTYPES:
            for op in OPS:
                for key, value in _op_case(op, dtype).items():
                    results[f"{backend}/{dtype}/op/{op}/{key}"] = value
            for name in MODELS:
                indexes = ("exact", "faiss-ivf") if name in ("sam", "sdnc") else ("exact",)
                for index in indexes:
                    for preload in (False, True):
                        case = f"{backend}/{dtype}/model/{name}/{index}/preload={preload}"
                        for key, value in _model_case(name, dtype, index, preload).items():
                            results[f"{case}/{key}"] = value
    os.environ.pop("SPARSEMEM_BACKEND", None)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("record", "compare"))
    parser.add_argument("file")
    args = parser.parse_args()
    torch.set_num_threads(1)  # reductions in one order: the recording is reproducible
    results = record_all()
    if args.action == "record":
        torch.save(results, args.file)
        print(f"recorded {len(results)} tensors to {args.file}")
        return 0
    before = torch.load(args.file, weights_only=True)
    differ = [key for key in before if key not in results or not torch.equal(before[key], results[key])]
    differ += [key for key in results if key not in before]
    for key in differ:
        print(f"DIFFERS: {key}")
    print(f"{len(before)} recorded, {len(results)} now, {len(differ)} differ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
