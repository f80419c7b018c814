"""T steps of a DNC with an LSTM-cell controller as one op: what sparsemem.models.DNC's forward runs
on the CPU (internal: sparsemem.ops does not export it).

A small DNC's step is a few microseconds of arithmetic inside a few hundred of calls: LSTMCell, the
interface Linear and its split, three memory ops and their autograd nodes. The cpp kernel
(csrc/cpu/dnc_sequence.cpp) runs the whole recurrence and its backward through time in C++; its
torch backend is the reference loop (reference/dnc.py: dnc_sequence_ref) differentiated by vjp.
"""

import torch
from torch import Tensor

from sparsemem import _backends
from sparsemem._checks import Shapes
from sparsemem.ops._define import define_op
from sparsemem.reference import dnc_sequence_ref


def _fake(gates_x, hidden, cell, reads, memory, usage, link, precedence, read_w, write_w, *_):
    T = gates_x.shape[0]
    every_hidden = hidden.new_empty(T, *hidden.shape)
    every_reads = reads.new_empty(T, *reads.shape)
    state = (cell, memory, usage, link, precedence, read_w, write_w)
    return every_hidden, every_reads, *(torch.empty_like(x) for x in state)


_dnc_sequence = define_op(
    "dnc_sequence",
    "(Tensor gates_x, Tensor hidden, Tensor cell, Tensor reads, Tensor memory, Tensor usage, Tensor link, "
    "Tensor precedence, Tensor read_w, Tensor write_w, Tensor weight_rh, Tensor weight_if, Tensor bias_if, "
    "Tensor active, int checkpoint_every) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    dnc_sequence_ref,
    _fake,
    differentiable=tuple(range(13)),
    stem="dnc_sequence",
    kernels=("cpp",),
    public=False,
)


def dnc_sequence(
    gates_x: Tensor,
    hidden: Tensor,
    cell: Tensor,
    reads: Tensor,
    memory: Tensor,
    usage: Tensor,
    link: Tensor,
    precedence: Tensor,
    read_w: Tensor,
    write_w: Tensor,
    weight_rh: Tensor,
    weight_if: Tensor,
    bias_if: Tensor,
    active: Tensor,
    checkpoint_every: int = 1,
) -> tuple[Tensor, ...]:
    """T steps of a DNC whose controller is an LSTM cell (reference/dnc.py: dnc_sequence_ref, which
    says what each argument holds; active [T, B] bool: False where a row is padding) -> (hidden
    [T, B, H], reads [T, B, R, W], cell [B, H], memory, usage, link, precedence, read_w, write_w).

    checkpoint_every=k: the backward keeps the N x N link before every k-th step and rebuilds the
    others from it (csrc/cpu/dnc_sequence.cpp): about T/k + k links instead of T, for k - 1 link
    updates more per k steps; the values and gradients are those of k = 1, bit for bit.
    Value checks are the caller's (the model checks x)."""
    shapes = Shapes().check("gates_x", gates_x, "T B G").check("hidden", hidden, "B H").check("cell", cell, "B H")
    shapes.check("reads", reads, "B R W").check("memory", memory, "B N W").check("usage", usage, "B N")
    shapes.check("link", link, "B N N").check("precedence", precedence, "B N").check("read_w", read_w, "B R N")
    shapes.check("write_w", write_w, "B N").check("weight_if", weight_if, "I H").check("bias_if", bias_if, "I")
    shapes.check("active", active, "T B", kind="bool")
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be a positive int; got {checkpoint_every!r}")
    T, B, G, H = (shapes.size(letter) for letter in "TBGH")
    R, W, I = shapes.size("R"), shapes.size("W"), shapes.size("I")
    if T < 1 or B < 1 or G != 4 * H or tuple(weight_rh.shape) != (4 * H, R * W + H):
        raise ValueError(
            f"dnc_sequence needs T, B >= 1, gates_x [T, B, 4H] and weight_rh [4H, R*W + H]; got gates_x "
            f"{list(gates_x.shape)}, hidden {list(hidden.shape)}, reads {list(reads.shape)}, weight_rh "
            f"{list(weight_rh.shape)}"
        )
    if I != R * W + 3 * W + 5 * R + 3:
        raise ValueError(
            f"dnc_sequence needs weight_if [I, H] with I = R*W + 3W + 5R + 3 = {R * W + 3 * W + 5 * R + 3} "
            f"(R={R}, W={W}); got {list(weight_if.shape)}"
        )
    return _dnc_sequence(
        gates_x,
        hidden,
        cell,
        reads,
        memory,
        usage,
        link,
        precedence,
        read_w,
        write_w,
        weight_rh,
        weight_if,
        bias_if,
        active,
        checkpoint_every,
    )


def runs_in_cpp(device: torch.device) -> bool:
    """Whether dnc_sequence runs its C++ kernel on `device` (SPARSEMEM_BACKEND included): where it does
    not, a model's step loop is as fast and runs the other ops' backends."""
    return _backends.backend_for("dnc_sequence", device) == "cpp"
