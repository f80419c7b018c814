"""T steps of a SAM, or of an SDNC, with an LSTM-cell controller as one op, over a dense copy of a small
memory (and of an SDNC's link store): what sparsemem.models.SAM's and SDNC's forward run on the CPU
(internal: sparsemem.ops does not export them).

A small SAM's step is well under a millisecond of arithmetic inside a few hundred calls: LSTMCell,
the interface Linear and its split, the LRU, the journaled write, the index search, the read and
their autograd nodes (an SDNC's step adds the link update and the temporal reads: twice as many).
The cpp kernel (csrc/cpu/sam_sequence.cpp) runs the whole recurrence and its backward through time in
C++; the torch backend is the reference loop (reference/sam.py: sam_sequence_ref, reference/sdnc.py:
sdnc_sequence_ref) differentiated by vjp.
"""

import torch
from torch import Tensor

from sparsemem import _backends
from sparsemem._checks import Shapes
from sparsemem.ops._define import define_op
from sparsemem.reference import sam_sequence_ref, sdnc_sequence_ref


def _fake(gates_x, hidden, cell, reads, memory, last_access, written, read_idx, read_w, write_idx, write_w, *rest):
    T = gates_x.shape[0]
    every_hidden = hidden.new_empty(T, *hidden.shape)
    every_reads = reads.new_empty(T, *reads.shape)
    state = (cell, memory, last_access, read_idx, read_w, write_idx, write_w, written)
    if len(rest) > 5:  # sdnc_sequence: the link store, the precedence, and the rows the call could change
        link_idx, link_w, precedence_idx, precedence_w = rest[:4]
        state += (link_idx, link_w, precedence_idx, precedence_w, written.new_empty(link_idx.shape[:2]))
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

_sdnc_sequence = define_op(
    "sdnc_sequence",
    "(Tensor gates_x, Tensor hidden, Tensor cell, Tensor reads, Tensor memory, Tensor last_access, "
    "Tensor written, Tensor read_idx, Tensor read_w, Tensor write_idx, Tensor write_w, Tensor link_idx, "
    "Tensor link_w, Tensor precedence_idx, Tensor precedence_w, Tensor weight_rh, Tensor weight_if, "
    "Tensor bias_if, Tensor active, int clock) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
    "Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    sdnc_sequence_ref,
    _fake,
    differentiable=(0, 1, 2, 3, 4, 8, 10, 12, 14, 15, 16, 17),
    stem="sam_sequence",
    kernels=("cpp",),
    public=False,
)


def _check(op: str, args: tuple, shapes: Shapes) -> None:
    """The checks both ops share, on sam_sequence's arguments (args, in its order): SAM's shapes on
    shapes, with R Q read places per head (Q = K for sam_sequence, 3K for sdnc_sequence), J = R Q + 1
    and the interface's width I."""
    gates_x, hidden, cell, reads, memory, last_access, written, read_idx, read_w, write_idx, write_w = args[:11]
    weight_rh, weight_if, bias_if, active, clock = args[11:]
    shapes.check("gates_x", gates_x, "T B G").check("hidden", hidden, "B H").check("cell", cell, "B H")
    shapes.check("reads", reads, "B R W").check("memory", memory, "B N W")
    shapes.check("last_access", last_access, "B N", kind="index").check("written", written, "B N", kind="bool")
    shapes.check("read_idx", read_idx, "B R Q", kind="index").check("read_w", read_w, "B R Q")
    shapes.check("write_idx", write_idx, "B J", kind="index").check("write_w", write_w, "B J")
    shapes.check("weight_if", weight_if, "I H").check("bias_if", bias_if, "I")
    shapes.check("active", active, "T B", kind="bool")
    T, B, G, H = (shapes.size(letter) for letter in "TBGH")
    R, W, Q, J, I = (shapes.size(letter) for letter in "RWQJI")
    if T < 1 or B < 1 or G != 4 * H or tuple(weight_rh.shape) != (4 * H, R * W + H):
        raise ValueError(
            f"{op} needs T, B >= 1, gates_x [T, B, 4H] and weight_rh [4H, R*W + H]; got gates_x "
            f"{list(gates_x.shape)}, hidden {list(hidden.shape)}, reads {list(reads.shape)}, weight_rh "
            f"{list(weight_rh.shape)}"
        )
    width = 3 if op == "sdnc_sequence" else 1
    sizes = f"R={R}, W={W}, " + (f"3K={Q}" if width == 3 else f"K={Q}")
    interface = R * W + R + W + 2 + (3 * R if width == 3 else 0)
    if Q % width or J != R * Q + 1 or interface != I:
        names = ("3K", "R*3K", "R*W + R + W + 2 + 3R") if width == 3 else ("K", "R*K", "R*W + R + W + 2")
        raise ValueError(
            f"{op} needs read weights [B, R, {names[0]}], write weights [B, J] with J = {names[1]} + 1 = "
            f"{R * Q + 1} and weight_if [I, H] with I = {names[2]} = {interface} ({sizes}); got read_w "
            f"{list(read_w.shape)}, write_w {list(write_w.shape)}, weight_if {list(weight_if.shape)}"
        )
    if isinstance(clock, bool) or not isinstance(clock, int) or clock < 0:
        raise ValueError(f"clock must be an int >= 0; got {clock!r}")


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
    args = (gates_x, hidden, cell, reads, memory, last_access, written, read_idx, read_w, write_idx, write_w)
    args += (weight_rh, weight_if, bias_if, active, clock)
    _check("sam_sequence", args, Shapes())
    return _sam_sequence(*args)


def sdnc_sequence(
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
    link_idx: Tensor,
    link_w: Tensor,
    precedence_idx: Tensor,
    precedence_w: Tensor,
    weight_rh: Tensor,
    weight_if: Tensor,
    bias_if: Tensor,
    active: Tensor,
    clock: int,
) -> tuple[Tensor, ...]:
    """T steps of an SDNC whose controller is an LSTM cell (reference/sdnc.py: sdnc_sequence_ref, which
    says what each argument holds) -> (hidden [T, B, H], reads [T, B, R, W], cell [B, H], memory,
    last_access, read_idx, read_w, write_idx, write_w, written_now [B, N], link_idx, link_w,
    precedence_idx, precedence_w, linked_now [B, 2N]). Value checks are the caller's."""
    sam_args = (gates_x, hidden, cell, reads, memory, last_access, written, read_idx, read_w, write_idx, write_w)
    shapes = Shapes().check("link_idx", link_idx, "B 2N K_L", kind="index").check("link_w", link_w, "B 2N K_L")
    shapes.check("precedence_idx", precedence_idx, "B K_L", kind="index").check("precedence_w", precedence_w, "B K_L")
    _check("sdnc_sequence", (*sam_args, weight_rh, weight_if, bias_if, active, clock), shapes)
    if shapes.size("2N") != 2 * shapes.size("N"):  # the link rows: of L, then of L^T
        raise ValueError(
            f"sdnc_sequence needs link rows [B, 2N, K_L] (N={shapes.size('N')}); got link_w {list(link_w.shape)}"
        )
    links = (link_idx, link_w, precedence_idx, precedence_w)
    return _sdnc_sequence(*sam_args, *links, weight_rh, weight_if, bias_if, active, clock)


def runs_in_cpp(op: str, device: torch.device) -> bool:
    """Whether op (sam_sequence or sdnc_sequence) runs its C++ kernel on `device` (SPARSEMEM_BACKEND
    included): where it does not, a model's step loop is as fast and runs the other ops' backends."""
    return _backends.backend_for(op, device) == "cpp"
