"""DNC temporal links: link and precedence update, forward and backward reads through the links."""

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils.weak import WeakIdKeyDictionary

from sparsemem import _backends
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
    check_finite("precedence", precedence)
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
    link: Tensor, precedence: Tensor, write_w: Tensor, read_w: Tensor, *, checkpoint_every: int | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """link_update then temporal_reads on the new links, fused so the N x N links are read and written once.

    link [B, N, N], precedence [B, N], write_w [B, N], read_w [B, R, N]
    -> (link [B, N, N], precedence [B, N], forward [B, R, N], backward [B, R, N]).

    checkpoint_every=k: the call is one step of a chain (a DNC's steps, each taking the link the
    one before returned) whose backward keeps the N x N link of only every k-th step; the links
    between are rebuilt from it in the backward, from the O(N) precedence and write weights each
    step keeps, by the kernel that made them in the forward (so they are the forward's values,
    not an inversion of the update, which loses rows written with weight near 1). Values and
    gradients are those of the plain op; a chain of T steps keeps about T/k + k links instead of
    T + 1, for k - 1 link updates more per k steps. None: the plain op, which keeps every link.
    """
    shapes = Shapes().check("link", link, "B N N").check("precedence", precedence, "B N")
    shapes.check("write_w", write_w, "B N").check("read_w", read_w, "B R N")
    check_finite("link", link, state=True)
    check_finite("precedence", precedence)
    check_finite("write_w", write_w)
    check_finite("read_w", read_w)
    if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or checkpoint_every < 1):
        raise ValueError(f"checkpoint_every must be a positive int or None; got {checkpoint_every!r}")
    inputs = (link, precedence, write_w, read_w)
    chained = (
        checkpoint_every is not None
        and link.shape[0] > 0  # B = 0: the plain op returns empty outputs without a kernel
        and torch.is_grad_enabled()
        and any(x.requires_grad for x in inputs)
        and not torch.compiler.is_compiling()
    )
    if not chained:
        return _link_update_reads(*inputs)
    position = _CHAIN.get(link)
    if position is not None and position[1] < checkpoint_every and len(position[0].steps) == position[1]:
        segment, depth = position
    else:  # a link no chain step made (a first step, a reset or padded state), a full segment, or a branch
        segment, depth = _Segment(link.detach()), 0
    outputs = _ChainStep.apply(*inputs, segment, depth)
    segment.steps.append((precedence.detach(), write_w.detach()))
    _CHAIN[outputs[0]] = (segment, depth + 1)
    return outputs


class _Segment:
    """The links L_0 .. L_D of consecutive chain steps, kept as L_0 and the vectors that make the
    others: steps[d] = (p_d, w_{d+1}), so L_{d+1} = link_update(L_d, p_d, w_{d+1}).

    The backward runs the steps in reverse: the first one to need a link rebuilds all of them
    below it (D - 1 updates) and keeps them, and each is dropped once its step has used it."""

    def __init__(self, start: Tensor) -> None:
        self.start = start
        self.steps: list[tuple[Tensor, Tensor]] = []
        self.rebuilt: dict[int, Tensor] = {}

    def link(self, depth: int) -> Tensor:
        if depth == 0:
            return self.start
        if depth in self.rebuilt:
            return self.rebuilt.pop(depth)
        below = max((d for d in self.rebuilt if d < depth), default=0)
        link = self.rebuilt[below] if below else self.start
        update = _backends.kernel("link_update", link.device).forward
        for d in range(below, depth):
            link, _ = update(link, *self.steps[d])
            if d + 1 < depth:
                self.rebuilt[d + 1] = link
        return link


# The link each chain step returned -> (its segment, its depth there); weak, so a link that is
# dropped takes its entry with it. Keyed by identity: a tensor made any other way starts a segment.
_CHAIN: WeakIdKeyDictionary = WeakIdKeyDictionary()


class _ChainStep(torch.autograd.Function):
    """link_update_reads whose backward gets its input link from the segment instead of saving it."""

    @staticmethod
    def forward(ctx, link, precedence, write_w, read_w, segment, depth):
        outputs = _backends.kernel("link_update_reads", link.device).forward(link, precedence, write_w, read_w)
        ctx.segment, ctx.depth = segment, depth
        ctx.save_for_backward(precedence, write_w, read_w)
        return outputs

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        precedence, write_w, read_w = ctx.saved_tensors
        link = ctx.segment.link(ctx.depth)
        # no backend's backward reads the outputs' values, only their dtypes: stand-ins of no size
        stand_in = link.new_zeros(()).expand(link.shape)
        inputs = (link, precedence, write_w, read_w)
        input_grads = _backends.kernel("link_update_reads", link.device).backward(grads, inputs, (stand_in,) * 4)
        return (*input_grads, None, None)
