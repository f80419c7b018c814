"""Neural Turing Machine addressing (Graves et al. 2014): the specification."""

import torch
from torch import Tensor

from sparsemem.reference.dnc import content_weights_ref


def circular_shift_ref(weights: Tensor, shift: Tensor) -> Tensor:
    """w~[i] = sum_s w[(i - o_s) mod N] s[s], offsets o_s = s - S // 2 (S odd: -1, 0, +1 for S = 3).

    weights [B, R, N], shift [B, R, S] -> [B, R, N].
    """
    size = shift.shape[-1]
    shifted = [torch.roll(weights, s - size // 2, dims=-1) for s in range(size)]
    return sum(w * shift[..., s : s + 1] for s, w in enumerate(shifted))


def sharpen_ref(weights: Tensor, sharpen: Tensor) -> Tensor:
    """w[i]^gamma / sum_j w[j]^gamma, gamma >= 1.

    Computed as (w / max w)^gamma normalised, the same value, so that a large
    gamma cannot underflow every entry to 0 and give 0 / 0.
    """
    peak = weights.amax(-1, keepdim=True)
    powered = (weights / peak) ** sharpen.unsqueeze(-1)
    return powered / powered.sum(-1, keepdim=True)


def ntm_address_ref(
    memory: Tensor,
    key: Tensor,
    strength: Tensor,
    gate: Tensor,
    shift: Tensor,
    sharpen: Tensor,
    prev_w: Tensor,
) -> Tensor:
    """NTM addressing of R heads: content, interpolation, circular shift, sharpening.

    w^c = C(M, k, beta); w^g = g w^c + (1 - g) w_{t-1}; w~ = w^g * s (circular);
    w = w~^gamma / sum w~^gamma.
    memory [B, N, W], key [B, R, W], strength [B, R], gate [B, R] in [0, 1],
    shift [B, R, S] (a distribution over offsets), sharpen [B, R] >= 1,
    prev_w [B, R, N] -> [B, R, N].
    """
    content = content_weights_ref(memory, key, strength)
    gated = gate.unsqueeze(-1) * content + (1 - gate.unsqueeze(-1)) * prev_w
    return sharpen_ref(circular_shift_ref(gated, shift), sharpen)
