"""NTM addressing of R heads: content, interpolation, circular shift, sharpening."""

import torch
from torch import Tensor

from sparsemem._checks import Shapes, check_finite, check_range
from sparsemem.ops._define import define_op
from sparsemem.reference import ntm_address_ref

_ntm_address = define_op(
    "ntm_address",
    "(Tensor memory, Tensor key, Tensor strength, Tensor gate, Tensor shift, Tensor sharpen, Tensor prev_w) -> Tensor",
    ntm_address_ref,
    lambda memory, key, strength, gate, shift, sharpen, prev_w: torch.empty_like(prev_w),
    differentiable=(0, 1, 2, 3, 4, 5, 6),
    stem="ntm",
    kernels=("cpp", "triton"),
)


def ntm_address(
    memory: Tensor,
    key: Tensor,
    strength: Tensor,
    gate: Tensor,
    shift: Tensor,
    sharpen: Tensor,
    prev_w: Tensor,
) -> Tensor:
    """memory [B, N, W], key [B, R, W], strength [B, R], gate [B, R], shift [B, R, S], sharpen [B, R],
    prev_w [B, R, N] -> weights [B, R, N]. S is odd (offsets -S//2 .. S//2); sharpen >= 1."""
    shapes = Shapes().check("memory", memory, "B N W").check("key", key, "B R W")
    shapes.check("strength", strength, "B R").check("gate", gate, "B R").check("shift", shift, "B R S")
    shapes.check("sharpen", sharpen, "B R").check("prev_w", prev_w, "B R N")
    if shift.shape[-1] % 2 == 0:
        raise ValueError(f"shift must have an odd size S (offsets -S//2 .. S//2); got S={shift.shape[-1]}")
    check_finite("memory", memory, state=True)
    for name, value in (("key", key), ("strength", strength), ("shift", shift), ("prev_w", prev_w)):
        check_finite(name, value)
    check_range("gate", gate, 0.0, 1.0)
    check_range("sharpen", sharpen, 1.0, float("inf"))
    return _ntm_address(memory, key, strength, gate, shift, sharpen, prev_w)
