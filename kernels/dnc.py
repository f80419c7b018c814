"""dnc_write and dnc_read on the GPU: the dense ops' Triton kernels composed, as csrc/cpu/dnc.cpp
composes their C++ kernels (reference/dnc.py: dnc_write_ref, dnc_read_ref).

usage_update has no Triton kernel (O(B N R) pointwise work): its forward is the reference's, its
backward is written out here in torch, with prefix and suffix products as csrc/cpu/usage.cpp's (a
retention factor may be 0, so no division; torch.func.vjp of the reference cannot run inside the
dispatch modes around a custom op's body).
"""

import torch
from torch import Tensor

from sparsemem.reference import usage_update_ref

from .allocation import allocation_weights_backward, allocation_weights_forward
from .content import content_weights_backward, content_weights_forward
from .memory_rw import (
    memory_read_backward,
    memory_read_forward,
    memory_write_backward,
    memory_write_forward,
)


def _usage_update_backward(
    grad: Tensor, usage: Tensor, write_w: Tensor, read_w: Tensor, free_gates: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """With a = u + ww - u ww and t_r = 1 - f_r wr[r]: grad u = g psi (1 - ww), grad ww = g psi (1 - u),
    grad wr[r] = -f_r g a prod_{s != r} t_s, grad f_r = -sum_n wr[r, n] g_n a_n prod_{s != r} t_s[n]."""
    factors = 1 - free_gates.unsqueeze(-1) * read_w  # [B, R, N]
    ones = torch.ones_like(factors[:, :1])
    before = torch.cumprod(torch.cat([ones, factors], 1), 1)[:, :-1]  # prod_{s < r} t_s
    after = torch.cumprod(torch.cat([ones, factors.flip(1)], 1), 1)[:, :-1].flip(1)  # prod_{s > r} t_s
    others = before * after
    retention = torch.prod(factors, 1)
    written = usage + write_w - usage * write_w
    grad_factor = -(grad * written).unsqueeze(1) * others  # d u' / d t_r, times g
    return (
        grad * retention * (1 - write_w),
        grad * retention * (1 - usage),
        grad_factor * free_gates.unsqueeze(-1),
        (grad_factor * read_w).sum(-1),
    )


def dnc_write_forward(
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
    new_usage = usage_update_ref(usage, write_w, read_w, free_gates)
    allocation = allocation_weights_forward(new_usage)
    write_content = content_weights_forward(memory, write_key, write_strength)
    new_write_w = write_gate * torch.lerp(write_content[:, 0], allocation, allocation_gate)
    new_memory = memory_write_forward(memory, new_write_w, erase, add)
    return new_memory, new_usage, new_write_w, allocation, write_content


def dnc_write_backward(grads, inputs, outputs) -> tuple[Tensor, ...]:
    """The chain rule back through dnc_write_forward, as csrc/cpu/dnc.cpp's ext_dnc_write_backward."""
    grad_memory, grad_usage, grad_write_w, grad_allocation, grad_write_content = grads
    memory, usage, write_w, read_w, free_gates, write_key, write_strength, allocation_gate, write_gate, erase, add = (
        inputs
    )
    new_memory, new_usage, new_write_w, allocation, write_content = outputs
    written = memory_write_backward((grad_memory,), (memory, new_write_w, erase, add), (new_memory,))
    grad_w = grad_write_w + written[1]
    content = write_content[:, 0]
    grad_mix = grad_w * write_gate
    grad_write_gate = (grad_w * torch.lerp(content, allocation, allocation_gate)).sum(-1, keepdim=True)
    grad_allocation_gate = (grad_mix * (allocation - content)).sum(-1, keepdim=True)
    grad_content = grad_write_content + (grad_mix * (1 - allocation_gate)).unsqueeze(1)
    addressed = content_weights_backward((grad_content,), (memory, write_key, write_strength), (write_content,))
    (grad_new_usage,) = allocation_weights_backward(
        (grad_allocation + grad_mix * allocation_gate,), (new_usage,), (allocation,)
    )
    used = _usage_update_backward(grad_usage + grad_new_usage, usage, write_w, read_w, free_gates)
    return (
        written[0] + addressed[0],
        *used[:4],
        addressed[1],
        addressed[2],
        grad_allocation_gate,
        grad_write_gate,
        written[2],
        written[3],
    )


def dnc_read_forward(
    memory: Tensor, read_keys: Tensor, read_strengths: Tensor, read_modes: Tensor, backward: Tensor, forward: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    read_content = content_weights_forward(memory, read_keys, read_strengths)
    modes = read_modes.unsqueeze(-1)
    read_w = modes[:, :, 0] * backward + modes[:, :, 1] * read_content + modes[:, :, 2] * forward
    return memory_read_forward(memory, read_w), read_w, read_content


def dnc_read_backward(grads, inputs, outputs) -> tuple[Tensor, ...]:
    """The chain rule back through dnc_read_forward, as csrc/cpu/dnc.cpp's ext_dnc_read_backward."""
    grad_reads, grad_read_w, grad_read_content = grads
    memory, read_keys, read_strengths, read_modes, backward, forward = inputs
    reads, read_w, read_content = outputs
    read = memory_read_backward((grad_reads,), (memory, read_w), (reads,))
    grad_w = grad_read_w + read[1]
    grad_modes = torch.stack(
        [(grad_w * backward).sum(-1), (grad_w * read_content).sum(-1), (grad_w * forward).sum(-1)], -1
    )
    modes = read_modes.unsqueeze(-1)
    addressed = content_weights_backward(
        (grad_read_content + modes[:, :, 1] * grad_w,), (memory, read_keys, read_strengths), (read_content,)
    )
    return (
        read[0] + addressed[0],
        addressed[1],
        addressed[2],
        grad_modes,
        modes[:, :, 0] * grad_w,
        modes[:, :, 2] * grad_w,
    )
