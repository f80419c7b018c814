"""A DNC step's write half and read half, each one op: what DNCMemory.step runs around the links.

Each composes the dense ops (usage_update, allocation_weights, content_weights, memory_write,
memory_read) with the products that mix their results. At the sizes the DNC trains at a step's
time is the cost of calling ops, not their arithmetic; two calls and two autograd nodes replace
six calls and a dozen products. The cpp kernel (csrc/cpu/dnc.cpp) composes the dense ops' cpp
kernels, the triton one (kernels/dnc.py) their Triton kernels.
"""

import torch
from torch import Tensor

from sparsemem._checks import Shapes, check_finite, check_range
from sparsemem.ops._define import define_op
from sparsemem.reference import dnc_read_ref, dnc_write_ref


def _dnc_write_fake(memory, usage, write_w, read_w, free_gates, write_key, *_):
    B, N = usage.shape
    return (
        torch.empty_like(memory),
        torch.empty_like(usage),
        torch.empty_like(usage),
        torch.empty_like(usage),
        usage.new_empty(B, 1, N),
    )


_dnc_write = define_op(
    "dnc_write",
    "(Tensor memory, Tensor usage, Tensor write_w, Tensor read_w, Tensor free_gates, Tensor write_key, "
    "Tensor write_strength, Tensor allocation_gate, Tensor write_gate, Tensor erase, Tensor add) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    dnc_write_ref,
    _dnc_write_fake,
    differentiable=tuple(range(11)),
    stem="dnc",
    kernels=("cpp", "triton"),
)


def dnc_write(
    memory: Tensor,
    usage: Tensor,
    write_w: Tensor,
    read_w: Tensor,
    free_gates: Tensor,
    write_key: Tensor,
    write_strength: Tensor,
    allocation_gate: Tensor,
    write_gate: Tensor,
    erase: Tensor,
    add: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Usage, allocation, write weights and write of one DNC step (reference/dnc.py: dnc_write_ref).

    memory [B, N, W], usage [B, N], write_w [B, N] and read_w [B, R, N] (the previous step's),
    free_gates [B, R], write_key [B, 1, W], write_strength [B, 1], allocation_gate [B, 1],
    write_gate [B, 1], erase [B, W], add [B, W]
    -> (memory [B, N, W], usage [B, N], write_w [B, N], allocation [B, N], write_content [B, 1, N]).
    """
    shapes = Shapes().check("memory", memory, "B N W").check("usage", usage, "B N")
    shapes.check("write_w", write_w, "B N").check("read_w", read_w, "B R N").check("free_gates", free_gates, "B R")
    shapes.check("write_key", write_key, "B 1 W").check("write_strength", write_strength, "B 1")
    shapes.check("allocation_gate", allocation_gate, "B 1").check("write_gate", write_gate, "B 1")
    shapes.check("erase", erase, "B W").check("add", add, "B W")
    check_finite("memory", memory, state=True)
    check_finite("usage", usage, state=True)
    for name, value in (("write_w", write_w), ("read_w", read_w), ("write_key", write_key)):
        check_finite(name, value)
    check_finite("write_strength", write_strength)
    check_finite("add", add)
    for name, value in (("free_gates", free_gates), ("allocation_gate", allocation_gate), ("write_gate", write_gate)):
        check_range(name, value, 0.0, 1.0)
    check_range("erase", erase, 0.0, 1.0)
    return _dnc_write(
        memory, usage, write_w, read_w, free_gates, write_key, write_strength, allocation_gate, write_gate, erase, add
    )


def _dnc_read_fake(memory, read_keys, read_strengths, read_modes, backward, forward):
    return torch.empty_like(read_keys), torch.empty_like(backward), torch.empty_like(backward)


_dnc_read = define_op(
    "dnc_read",
    "(Tensor memory, Tensor read_keys, Tensor read_strengths, Tensor read_modes, Tensor backward, Tensor forward) "
    "-> (Tensor, Tensor, Tensor)",
    dnc_read_ref,
    _dnc_read_fake,
    differentiable=tuple(range(6)),
    stem="dnc",
    kernels=("cpp", "triton"),
)


def dnc_read(
    memory: Tensor, read_keys: Tensor, read_strengths: Tensor, read_modes: Tensor, backward: Tensor, forward: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Content weights, read weights and reads of one DNC step (reference/dnc.py: dnc_read_ref).

    memory [B, N, W] (after the step's write), read_keys [B, R, W], read_strengths [B, R],
    read_modes [B, R, 3] (backward, content, forward), backward and forward [B, R, N] (the
    temporal weights, ops.link_update_reads) -> (reads [B, R, W], read_w [B, R, N], read_content [B, R, N]).
    """
    shapes = Shapes().check("memory", memory, "B N W").check("read_keys", read_keys, "B R W")
    shapes.check("read_strengths", read_strengths, "B R").check("read_modes", read_modes, "B R 3")
    shapes.check("backward", backward, "B R N").check("forward", forward, "B R N")
    check_finite("memory", memory, state=True)
    for name, value in (("read_keys", read_keys), ("read_strengths", read_strengths)):
        check_finite(name, value)
    check_range("read_modes", read_modes, 0.0, 1.0)
    check_finite("backward", backward)
    check_finite("forward", forward)
    return _dnc_read(memory, read_keys, read_strengths, read_modes, backward, forward)
