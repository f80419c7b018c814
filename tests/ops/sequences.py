"""Helpers for the sequence ops' tests (dnc_sequence, sam_sequence, sdnc_sequence): leaves that take
gradients, and outputs with the gradients of seeded random cotangents on their float outputs."""

import torch


def takes_grad(a: object) -> bool:
    return isinstance(a, torch.Tensor) and a.is_floating_point()


def leaves(args):
    """The float inputs as leaves that take gradients; the others (masks, slots, ints) as they are."""
    return [a.detach().clone().requires_grad_(True) if takes_grad(a) else a for a in args]


def outputs_and_grads(call, args):
    inputs = leaves(args)
    outputs = call(*inputs)
    floats = [(i, o) for i, o in enumerate(outputs) if o.is_floating_point()]
    seeds = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i), dtype=o.dtype) for i, o in floats]
    return outputs, torch.autograd.grad([o for _, o in floats], [x for x in inputs if takes_grad(x)], seeds)
