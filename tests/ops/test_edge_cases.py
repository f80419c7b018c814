"""Empty and zero sizes, and a k that is not an int, through every public op on every backend here.

B = 0 gives empty outputs and empty gradients; any other size letter at 0 (N, W, R, K, K_L, S and
the gathered-row counts J, F, G, Q) or a non-int k is a ValueError that names it; every backend
answers alike. The kernels themselves (cpp, triton, called without the public checks) survive the
same sizes: a zero size never divides by zero or reads out of bounds (before, link_update's cpp
kernel ended the process with SIGFPE at B = 0, topk_content's at W = 0).
"""

import re

import pytest
import torch

import sparsemem as sm
from sparsemem import _backends
from sparsemem.testing import OPS, op_inputs
from tests.conftest import cpu_backends

# Each op's positional arguments in glossary letters; "k" is an int argument (the letter K).
SHAPES = {
    "content_weights": ("B N W", "B R W", "B R"),
    "content_read": ("B N W", "B R W", "B R"),
    "usage_update": ("B N", "B N", "B R N", "B R"),
    "dnc_write": ("B N W", "B N", "B N", "B R N", "B R", "B 1 W", "B 1", "B 1", "B 1", "B W", "B W"),
    "dnc_read": ("B N W", "B R W", "B R", "B R 3", "B R N", "B R N"),
    "allocation_weights": ("B N",),
    "memory_write": ("B N W", "B N", "B W", "B W"),
    "memory_read": ("B N W", "B R N"),
    "link_update": ("B N N", "B N", "B N"),
    "temporal_reads": ("B N N", "B R N"),
    "link_update_reads": ("B N N", "B N", "B N", "B R N"),
    "ntm_address": ("B N W", "B R W", "B R", "B R", "B R S", "B R", "B R N"),
    "topk_content": ("B N W", "B R W", "k"),
    "sparse_read": ("B N W", "B R K", "B R W", "B R"),
    "sparse_write": ("B J W", "B J", "B W", "B J"),
    "sparse_link_update": ("B F", "B F K_L", "B F K_L", "B G", "B G K_L", "B G K_L", "B K_L", "B K_L", "B J", "B J"),
    "sparse_temporal_reads": ("B R Q", "B R Q K_L", "B R Q K_L", "B R Q K_L", "B R Q K_L", "k"),
}


def _letters(op: str) -> list[str]:
    letters = {letter for dims in SHAPES[op] for letter in dims.split() if not letter.isdigit()} - {"B"}
    return sorted(letter if letter != "k" else "K" for letter in letters)


def _inputs(op: str, letter: str | None = None, k: object = None) -> list:
    """op_inputs at B=2, N=6, W=4, R=2 with every dimension named `letter` cut to 0 (K: k = 0),
    or with k replaced."""
    args = list(op_inputs(op, torch.float64, B=2, N=6, W=4, R=2))
    for position, dims in enumerate(SHAPES[op]):
        if dims == "k":
            args[position] = 0 if letter == "K" else args[position] if k is None else k
            continue
        for dim, name in enumerate(dims.split()):
            if name == letter:
                args[position] = args[position].narrow(dim, 0, 0).contiguous()
    return args


def _leaves(args: list) -> list:
    return [a.requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


def _as_tuple(value):
    return value if isinstance(value, tuple) else (value,)


def test_the_table_covers_every_public_op():
    assert set(SHAPES) == set(OPS)
    for op in OPS:
        assert len(SHAPES[op]) == len(_backends.op_info(op).inputs), op


@pytest.mark.parametrize("op", OPS)
def test_empty_batch_gives_empty_outputs_and_gradients(op, use_backend):
    full = [(o.shape[1:], o.dtype) for o in _as_tuple(getattr(sm.ops, op)(*_inputs(op)))]
    for backend in cpu_backends(op):
        use_backend(backend)
        args = _leaves(_inputs(op, "B"))
        outputs = _as_tuple(getattr(sm.ops, op)(*args))
        assert [(o.shape, o.dtype) for o in outputs] == [((0, *shape), dtype) for shape, dtype in full], backend
        floats = [o for o in outputs if o.is_floating_point()]
        leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        grads = torch.autograd.grad(floats, leaves, [torch.ones_like(o) for o in floats])
        assert [g.shape for g in grads] == [a.shape for a in leaves], backend


ZERO_CASES = [(op, letter) for op in OPS for letter in _letters(op)]


@pytest.mark.parametrize(("op", "letter"), ZERO_CASES)
def test_a_zero_size_is_refused_naming_its_letter(op, letter, use_backend):
    messages = set()
    for backend in cpu_backends(op):
        use_backend(backend)
        with pytest.raises(ValueError) as error:
            getattr(sm.ops, op)(*_inputs(op, letter))
        # the letter itself, or for K the argument k that holds it
        assert re.search(rf"\b({letter}|k)\b" if letter == "K" else rf"\b{letter}\b", str(error.value)), str(error)
        messages.add(str(error.value))
    assert len(messages) == 1, messages  # every backend says the same


@pytest.mark.parametrize("op", [op for op in OPS if "k" in SHAPES[op]])
@pytest.mark.parametrize("k", [2.5, True, torch.tensor(2)])
def test_a_k_that_is_not_an_int_is_refused(op, k, use_backend):
    messages = set()
    for backend in cpu_backends(op):
        use_backend(backend)
        with pytest.raises(ValueError, match=r"k must be an int \(K, slots per head\)") as error:
            getattr(sm.ops, op)(*_inputs(op, k=k))
        messages.add(str(error.value))
    assert len(messages) == 1, messages


KERNEL_CASES = [
    (op, backend, letter)
    for op in OPS
    for backend in cpu_backends(op)
    if backend != "torch"  # the torch backend is the reference; the ops layer keeps zero sizes from it
    for letter in ["B", *_letters(op)]
]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter on empty tiles
@pytest.mark.parametrize(("op", "backend", "letter"), KERNEL_CASES)
def test_kernels_survive_zero_sizes(op, backend, letter):
    # Called directly, past the public checks (as torch.ops.sparsemem.ext_* can be): B = 0 gives
    # empty outputs and gradients; another zero size may be refused, but only with an exception.
    kernel = _backends.implementations(op)[backend]
    args = _inputs(op, letter)
    try:
        outputs = _as_tuple(kernel.forward(*args))
        grads = kernel.backward(
            [torch.ones_like(o) if o.is_floating_point() else torch.zeros_like(o) for o in outputs], args, outputs
        )
    except (RuntimeError, ValueError):
        assert letter != "B"
        return
    if letter == "B":
        assert all(o.numel() == 0 for o in outputs)
        assert all(g is None or g.shape == a.shape for g, a in zip(grads, args, strict=True))
