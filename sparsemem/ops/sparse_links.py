"""SDNC's sparse temporal links on gathered rows: the update of the touched rows, and the reads.

Storage (DESIGN.md, reference/sdnc.py): the forward store holds the rows of the link matrix L,
the backward store the rows of L^T, K_L (int64 index, value) pairs per row, index -1 for an
empty place, kept exact transposes of each other by the mutual top-K_L cut. Both ops are
functional on rows the caller gathered from the stores (like sparse_write on memory rows), so
a kernel sees fixed shapes only and the caller scatters the results back.
"""

from torch import Tensor

from sparsemem._checks import Shapes, check_finite, check_k
from sparsemem.ops._define import define_op
from sparsemem.reference import sparse_link_update_ref, sparse_temporal_reads_ref


def _sparse_link_update_fake(*inputs: Tensor) -> tuple[Tensor, ...]:
    _, forward_indices, forward_values, _, backward_indices, backward_values, precedence_indices, precedence_values = (
        inputs[:8]
    )
    return (
        forward_values.new_empty(forward_values.shape),
        forward_indices.new_empty(forward_indices.shape),
        backward_values.new_empty(backward_values.shape),
        backward_indices.new_empty(backward_indices.shape),
        precedence_values.new_empty(precedence_values.shape),
        precedence_indices.new_empty(precedence_indices.shape),
    )


_sparse_link_update = define_op(
    "sparse_link_update",
    "(Tensor forward_slots, Tensor forward_indices, Tensor forward_values, Tensor backward_slots, "
    "Tensor backward_indices, Tensor backward_values, Tensor precedence_indices, Tensor precedence_values, "
    "Tensor write_indices, Tensor write_weights) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    sparse_link_update_ref,
    _sparse_link_update_fake,
    differentiable=(2, 5, 7, 9),
    stem="sparse_links",
)


def sparse_link_update(
    forward_slots: Tensor,
    forward_indices: Tensor,
    forward_values: Tensor,
    backward_slots: Tensor,
    backward_indices: Tensor,
    backward_values: Tensor,
    precedence_indices: Tensor,
    precedence_values: Tensor,
    write_indices: Tensor,
    write_weights: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One step's link update on gathered rows (reference/sdnc.py: sdnc_link_update_ref).

    Inputs (int64 indices, -1 = none; F, G: rows gathered; J: write entries):
      forward_slots [B, F]: the slots i whose rows of L were gathered (distinct; -1: a padding row,
        whose indices must all be -1); forward_indices, forward_values [B, F, K_L]: row i holds
        L[i, forward_indices] = forward_values;
      backward_slots [B, G], backward_indices, backward_values [B, G, K_L]: the same for rows of L^T;
      precedence_indices, precedence_values [B, K_L]: p (distinct slots, -1: none);
      write_indices, write_weights [B, J]: w^W (a slot may repeat: its weights add up; -1: none).
    Contract: with W the written slots and P the precedence slots, forward_slots must contain
    W, the entries of the backward rows of W and of P, and backward_slots W, P and the entries of
    the forward rows of W (every row the step can change); any other gathered row comes back
    unchanged. Each row holds at most K_L entries and the stores are transposes of each other.
    Returns the new (forward_values, forward_indices, backward_values, backward_indices,
    precedence_values, precedence_indices) (values first, like topk_content's (scores, indices)),
    same shapes: in each row the kept entries ordered by (value desc, index asc), then (-1, 0).
    An entry of L is kept if positive and among the K_L largest of its row and of its column
    (ties: lower index). Padding rows stay empty.
    Differentiable in forward_values, backward_values, precedence_values and write_weights.
    """
    shapes = Shapes().check("forward_slots", forward_slots, "B F", kind="index")
    shapes.check("forward_indices", forward_indices, "B F K_L", kind="index")
    shapes.check("forward_values", forward_values, "B F K_L")
    shapes.check("backward_slots", backward_slots, "B G", kind="index")
    shapes.check("backward_indices", backward_indices, "B G K_L", kind="index")
    shapes.check("backward_values", backward_values, "B G K_L")
    shapes.check("precedence_indices", precedence_indices, "B K_L", kind="index")
    shapes.check("precedence_values", precedence_values, "B K_L")
    shapes.check("write_indices", write_indices, "B J", kind="index")
    shapes.check("write_weights", write_weights, "B J")
    check_finite("forward_values", forward_values, state=True)
    check_finite("backward_values", backward_values, state=True)
    check_finite("precedence_values", precedence_values)
    check_finite("write_weights", write_weights)
    return _sparse_link_update(
        forward_slots,
        forward_indices,
        forward_values,
        backward_slots,
        backward_indices,
        backward_values,
        precedence_indices,
        precedence_values,
        write_indices,
        write_weights,
    )


def _sparse_temporal_reads_fake(read_weights, forward_indices, forward_values, backward_indices, backward_values, k):
    shape = (*read_weights.shape[:2], k)
    weights, indices = read_weights.new_empty(shape), forward_indices.new_empty(shape)
    return weights, indices, weights.new_empty(shape), indices.new_empty(shape)


_sparse_temporal_reads = define_op(
    "sparse_temporal_reads",
    "(Tensor read_weights, Tensor forward_indices, Tensor forward_values, Tensor backward_indices, "
    "Tensor backward_values, SymInt k) -> (Tensor, Tensor, Tensor, Tensor)",
    sparse_temporal_reads_ref,
    _sparse_temporal_reads_fake,
    differentiable=(0, 2, 4),
    stem="sparse_links",
)


def sparse_temporal_reads(
    read_weights: Tensor,
    forward_indices: Tensor,
    forward_values: Tensor,
    backward_indices: Tensor,
    backward_values: Tensor,
    k: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Forward and backward reads through gathered link rows (reference/sdnc.py: sdnc_temporal_reads_ref).

    read_weights [B, R, Q]: w^R on Q read slots per head (a slot may repeat); forward_indices,
    forward_values [B, R, Q, K_L]: the row of L at each read slot q; backward_* the row of L^T there.
    f = L w = sum_q w_q L^T[q, :] (backward rows: column q of L), b = L^T w = sum_q w_q L[q, :];
    entries on equal slots add up; each keeps its K largest positive entries.
    -> (forward_weights, forward_indices, backward_weights, backward_indices), each [B, R, K],
    ordered by (weight desc, slot asc), then (-1, 0). Differentiable in read_weights and the values.
    """
    shapes = Shapes().check("read_weights", read_weights, "B R Q")
    shapes.check("forward_indices", forward_indices, "B R Q K_L", kind="index")
    shapes.check("forward_values", forward_values, "B R Q K_L")
    shapes.check("backward_indices", backward_indices, "B R Q K_L", kind="index")
    shapes.check("backward_values", backward_values, "B R Q K_L")
    check_k(k)
    check_finite("read_weights", read_weights)
    check_finite("forward_values", forward_values, state=True)
    check_finite("backward_values", backward_values, state=True)
    return _sparse_temporal_reads(read_weights, forward_indices, forward_values, backward_indices, backward_values, k)
