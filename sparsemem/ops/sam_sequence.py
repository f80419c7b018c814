"""T steps of a SAM with an LSTM-cell controller as one op, over a dense copy of a small memory: what
sparsemem.models.SAM's forward runs on the CPU (internal: sparsemem.ops does not export it).

A small SAM's step is well under a millisecond of arithmetic inside a few hundred calls: LSTMCell,
the interface Linear and its split, the LRU, the journaled write, the index search, the read and
their autograd nodes. The cpp kernel (csrc/cpu/sam_sequence.cpp) runs the whole recurrence and its
backward through time in C++; its torch backend is the reference loop (reference/sam.py:
sam_sequence_ref) differentiated by vjp.
"""

import torch
from torch import Tensor

from sparsemem import _backends
from sparsemem._checks import Shapes
from sparsemem.ops._define import define_op
from sparsemem.reference import sam_sequence_ref


def _fake(gates_x, hidden, cell, reads, memory, last_access, written, read_idx, read_w, write_idx, write_w, *_):
    T = gates_x.shape[0]
    every_hidden = hidden.new_empty(T, *hidden.shape)
    every_reads = reads.new_empty(T, *reads.shape)
    state = (cell, memory, last_access, read_idx, read_w, write_idx, write_w, written)
    return every_hidden, every_reads, *(torch.empty_like(x) for x in state)


_sam_sequence = define_op(
    "sam_sequence",
    "(Tensor gates_x, Tensor hidden, Tensor cell, Tensor reads, Tensor memory, Tensor last_access, "
    "Tensor written, Tensor read_idx, Tensor read_w, Tensor write_idx, Tensor write_w, Tensor weight_rh, "
    "Tensor weight_if, Tensor bias_if, Tensor active, int clock) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    sam_sequence_ref,
    _fake,
    differentiable=(0, 1, 2, 3, 4, 8, 10, 11, 12, 13),
    stem="sam_sequence",
    kernels=("cpp",),
    public=False,
)


def sam_sequence(
    gates_x: Tensor,
    hidden: Tensor,
    cell: Tensor,
    reads: Tensor,
    memory: Tensor,
    last_access: Tensor,
    written: Tensor,
    read_idx: Tensor,
    read_w: Tensor,
    write_idx: Tensor,
    write_w: Tensor,
    weight_rh: Tensor,
    weight_if: Tensor,
    bias_if: Tensor,
    active: Tensor,
    clock: int,
) -> tuple[Tensor, ...]:
    """T steps of a SAM whose controller is an LSTM cell (reference/sam.py: sam_sequence_ref, which
    says what each argument holds) -> (hidden [T, B, H], reads [T, B, R, W], cell [B, H], memory,
    last_access, read_idx, read_w, write_idx, write_w, written_now [B, N]).
    Value checks are the caller's (the model checks x)."""
    shapes = Shapes().check("gates_x", gates_x, "T B G").check("hidden", hidden, "B H").check("cell", cell, "B H")
    shapes.check("reads", reads, "B R W").check("memory", memory, "B N W")
    shapes.check("last_access", last_access, "B N", kind="index").check("written", written, "B N", kind="bool")
    shapes.check("read_idx", read_idx, "B R K", kind="index").check("read_w", read_w, "B R K")
    shapes.check("write_idx", write_idx, "B J", kind="index").check("write_w", write_w, "B J")
    shapes.check("weight_if", weight_if, "I H").check("bias_if", bias_if, "I")
    shapes.check("active", active, "T B", kind="bool")
    T, B, G, H = (shapes.size(letter) for letter in "TBGH")
    R, W, K, J, I = (shapes.size(letter) for letter in "RWKJI")
    if T < 1 or B < 1 or G != 4 * H or tuple(weight_rh.shape) != (4 * H, R * W + H):
        raise ValueError(
            f"sam_sequence needs T, B >= 1, gates_x [T, B, 4H] and weight_rh [4H, R*W + H]; got gates_x "
            f"{list(gates_x.shape)}, hidden {list(hidden.shape)}, reads {list(reads.shape)}, weight_rh "
            f"{list(weight_rh.shape)}"
        )
    if J != R * K + 1 or I != R * W + R + W + 2:
        raise ValueError(
            f"sam_sequence needs write weights [B, J] with J = R*K + 1 = {R * K + 1} and weight_if [I, H] with "
            f"I = R*W + R + W + 2 = {R * W + R + W + 2} (R={R}, W={W}, K={K}); got write_w {list(write_w.shape)}, "
            f"weight_if {list(weight_if.shape)}"
        )
    if isinstance(clock, bool) or not isinstance(clock, int) or clock < 0:
        raise ValueError(f"clock must be an int >= 0; got {clock!r}")
    return _sam_sequence(
        gates_x,
        hidden,
        cell,
        reads,
        memory,
        last_access,
        written,
        read_idx,
        read_w,
        write_idx,
        write_w,
        weight_rh,
        weight_if,
        bias_if,
        active,
        clock,
    )


def runs_in_cpp(device: torch.device) -> bool:
    """Whether sam_sequence runs its C++ kernel on `device` (SPARSEMEM_BACKEND included): where it does
    not, a model's step loop is as fast and runs the other ops' backends."""
    return _backends.backend_for("sam_sequence", device) == "cpp"
