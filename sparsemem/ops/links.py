"""DNC temporal links: link and precedence update, forward and backward reads through the links."""

import torch
from torch import Tensor

from sparsemem._checks import Shapes, check_finite
from sparsemem.ops._define import define_op
from sparsemem.reference import link_update_reads_ref, link_update_ref, temporal_reads_ref

_link_update = define_op(
    "link_update",
    "(Tensor link, Tensor precedence, Tensor write_w) -> (Tensor, Tensor)",
    link_update_ref,
    lambda link, precedence, write_w: (torch.empty_like(link), torch.empty_like(precedence)),
    differentiable=(0, 1, 2),
    stem="links",
)


def link_update(link: Tensor, precedence: Tensor, write_w: Tensor) -> tuple[Tensor, Tensor]:
    """link [B, N, N], precedence [B, N], write_w [B, N] -> (link [B, N, N], precedence [B, N])."""
    shapes = Shapes().check("link", link, "B N N").check("precedence", precedence, "B N")
    shapes.check("write_w", write_w, "B N")
    check_finite("link", link, state=True)
    check_finite("write_w", write_w)
    return _link_update(link, precedence, write_w)


def _temporal_reads_fake(link: Tensor, read_w: Tensor) -> tuple[Tensor, Tensor]:
    return torch.empty_like(read_w), torch.empty_like(read_w)


_temporal_reads = define_op(
    "temporal_reads",
    "(Tensor link, Tensor read_w) -> (Tensor, Tensor)",
    temporal_reads_ref,
    _temporal_reads_fake,
    differentiable=(0, 1),
    stem="links",
)


def temporal_reads(link: Tensor, read_w: Tensor) -> tuple[Tensor, Tensor]:
    """f = L w^r, b = L^T w^r: link [B, N, N], read_w [B, R, N] -> (forward [B, R, N], backward [B, R, N])."""
    Shapes().check("link", link, "B N N").check("read_w", read_w, "B R N")
    check_finite("link", link, state=True)
    check_finite("read_w", read_w)
    return _temporal_reads(link, read_w)


def _link_update_reads_fake(
    link: Tensor, precedence: Tensor, write_w: Tensor, read_w: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return torch.empty_like(link), torch.empty_like(precedence), torch.empty_like(read_w), torch.empty_like(read_w)


_link_update_reads = define_op(
    "link_update_reads",
    "(Tensor link, Tensor precedence, Tensor write_w, Tensor read_w) -> (Tensor, Tensor, Tensor, Tensor)",
    link_update_reads_ref,
    _link_update_reads_fake,
    differentiable=(0, 1, 2, 3),
    stem="links",
)


def link_update_reads(
    link: Tensor, precedence: Tensor, write_w: Tensor, read_w: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """link_update then temporal_reads on the new links, fused so the N x N links are read and written once.

    link [B, N, N], precedence [B, N], write_w [B, N], read_w [B, R, N]
    -> (link [B, N, N], precedence [B, N], forward [B, R, N], backward [B, R, N]).
    """
    shapes = Shapes().check("link", link, "B N N").check("precedence", precedence, "B N")
    shapes.check("write_w", write_w, "B N").check("read_w", read_w, "B R N")
    check_finite("link", link, state=True)
    check_finite("write_w", write_w)
    check_finite("read_w", read_w)
    return _link_update_reads(link, precedence, write_w, read_w)
