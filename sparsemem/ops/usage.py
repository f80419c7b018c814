"""DNC usage: u_t = (u + w^w - u w^w) * prod_r (1 - f_r w^r)."""

from torch import Tensor

from sparsemem._checks import Shapes, check_finite, check_range
from sparsemem.ops._define import define_op
from sparsemem.reference import usage_update_ref

_usage_update = define_op(
    "usage_update",
    "(Tensor usage, Tensor write_w, Tensor read_w, Tensor free_gates) -> Tensor",
    usage_update_ref,
    lambda usage, write_w, read_w, free_gates: usage.new_empty(usage.shape),
    differentiable=(0, 1, 2, 3),
    stem="usage",
    kernels=("cpp",),
)


def usage_update(usage: Tensor, write_w: Tensor, read_w: Tensor, free_gates: Tensor) -> Tensor:
    """usage [B, N], write_w [B, N], read_w [B, R, N], free_gates [B, R] -> new usage [B, N]."""
    shapes = Shapes().check("usage", usage, "B N").check("write_w", write_w, "B N")
    shapes.check("read_w", read_w, "B R N").check("free_gates", free_gates, "B R")
    check_finite("usage", usage, state=True)
    check_finite("write_w", write_w)
    check_finite("read_w", read_w)
    check_range("free_gates", free_gates, 0.0, 1.0)
    return _usage_update(usage, write_w, read_w, free_gates)
