"""One registration path for every op: custom_op + register_fake + register_autograd.

The registered forward and backward look up the kernel of the backend that runs
on the inputs' device (sparsemem._backends); the torch backend of every op is its
reference in sparsemem/reference, differentiated by torch.func.vjp, so each op is
correct on every device before any fast kernel exists.
"""

import importlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from sparsemem import _backends


def torch_kernel(reference: Callable, differentiable: Sequence[int]) -> _backends.Kernel:
    """The torch backend of an op: its reference forward, and the vjp of that reference.

    differentiable: positions of the float inputs that get gradients. Only the
    floating-point outputs are differentiated (topk's indices are not).
    """

    def forward(*inputs):
        with torch.no_grad():
            return reference(*inputs)

    def backward(grads, inputs, outputs):
        def float_outputs(*diff_inputs):
            args = list(inputs)
            for position, value in zip(differentiable, diff_inputs, strict=True):
                args[position] = value
            result = reference(*args)
            result = result if isinstance(result, tuple) else (result,)
            return tuple(out for out in result if out.is_floating_point())

        float_grads = tuple(g for g, out in zip(grads, outputs, strict=True) if out.is_floating_point())
        _, vjp = torch.func.vjp(float_outputs, *(inputs[i] for i in differentiable))
        input_grads: list[Tensor | None] = [None] * len(inputs)
        for position, grad in zip(differentiable, vjp(float_grads), strict=True):
            input_grads[position] = grad
        return tuple(input_grads)

    return _backends.Kernel(forward, backward)


def extension_kernel(name: str, schema: str, differentiable: Sequence[int]) -> _backends.Kernel:
    """The kernel of a compiled op pair torch.ops.sparsemem.ext_<name> / ext_<name>_backward.

    Convention (csrc/): ext_<name> takes the op's inputs; ext_<name>_backward takes
    (*grads, *inputs, *outputs) and returns a Tensor[] with one grad per differentiable input.
    """
    forward_op = getattr(torch.ops.sparsemem, f"ext_{name}")
    backward_op = getattr(torch.ops.sparsemem, f"ext_{name}_backward")
    num_outputs = schema.split("->")[1].count("Tensor")

    @torch.library.register_fake(f"sparsemem::ext_{name}_backward")
    def _(*args):
        inputs = args[num_outputs : len(args) - num_outputs]
        return [torch.empty_like(inputs[i]) for i in differentiable]

    def backward(grads, inputs, outputs):
        input_grads: list[Tensor | None] = [None] * len(inputs)
        for position, grad in zip(differentiable, backward_op(*grads, *inputs, *outputs), strict=True):
            input_grads[position] = grad
        return tuple(input_grads)

    return _backends.Kernel(forward_op, backward)


def triton_kernel(stem: str, name: str, differentiable: Sequence[int] | None = None) -> _backends.Kernel:
    """The triton backend of `name`: <name>_forward / <name>_backward in sparsemem.kernels.<stem>.

    The module (and with it triton) is imported on the first call, never by `import sparsemem`.
    The backward runs as the custom op sparsemem::triton_<name>_backward, so autograd tracing
    (torch.compile, opcheck) sees an op with a fake instead of a kernel launch. It gets the grads
    of the float outputs and the tensor inputs (a non-tensor input such as topk's k comes last)
    and returns one grad per differentiable input (default: every input).
    """

    def load():
        return importlib.import_module(f"sparsemem.kernels.{stem}")

    def positions(inputs: Sequence[object]) -> Sequence[int]:
        return range(len(inputs)) if differentiable is None else differentiable

    def forward(*inputs):
        return getattr(load(), f"{name}_forward")(*inputs)

    def run_backward(grads: list[Tensor], inputs: list[Tensor], outputs: list[Tensor]) -> list[Tensor]:
        return list(getattr(load(), f"{name}_backward")(grads, inputs, outputs))

    schema = "(Tensor[] grads, Tensor[] inputs, Tensor[] outputs) -> Tensor[]"
    backward_op = torch.library.custom_op(
        f"sparsemem::triton_{name}_backward", run_backward, mutates_args=(), schema=schema
    )
    backward_op.register_fake(
        lambda grads, inputs, outputs: [inputs[i].new_empty(inputs[i].shape) for i in positions(inputs)]
    )

    def backward(grads, inputs, outputs):
        float_grads = [g for g, out in zip(grads, outputs, strict=True) if out.is_floating_point()]
        tensors = [x for x in inputs if isinstance(x, Tensor)]
        input_grads: list[Tensor | None] = [None] * len(inputs)
        grads_out = backward_op(float_grads, tensors, list(outputs))
        for position, grad in zip(positions(inputs), grads_out, strict=True):
            input_grads[position] = grad
        return tuple(input_grads)

    return _backends.Kernel(forward, backward)


def _register_extension(name: str, schema: str, differentiable: Sequence[int], kernels: Sequence[str]) -> None:
    """Registers the compiled kernels of `name` (of the backends in `kernels`) for the devices the
    extension built them for."""
    if not _has_extension_op(name):
        return
    kernel = extension_kernel(name, schema, differentiable)
    for backend, dispatch_key in (("cpp", "CPU"), ("cuda", "CUDA")):
        if backend in kernels and torch._C._dispatch_has_kernel_for_dispatch_key(
            f"sparsemem::ext_{name}", dispatch_key
        ):
            _backends.register(name, backend, kernel)


def _has_extension_op(name: str) -> bool:
    """Whether the extension is built and defines torch.ops.sparsemem.ext_<name>."""
    return _backends.extension() is not None and hasattr(torch.ops.sparsemem, f"ext_{name}")


def schema_inputs(schema: str) -> tuple[str, ...]:
    """The argument names of a schema's argument part, e.g. "(Tensor(a!) rows, SymInt k) -> Tensor"."""
    arguments = schema.split("->")[0].strip()[1:-1]
    return tuple(argument.split()[-1] for argument in arguments.split(","))


def declare_op(
    name: str,
    stem: str,
    schema: str,
    differentiable: Sequence[int],
    kernels: Sequence[str] = ("cpp", "cuda", "triton"),
    public: bool = True,
) -> None:
    """Declare `name` in the backend registry: its family's file stem, the backends it has kernel
    sources for besides torch, its inputs; the cpp/cuda kernels register when the extension has them."""
    info = _backends.OpInfo(stem, ("torch", *kernels), schema_inputs(schema), tuple(differentiable), public)
    _backends.declare(name, info)


def define_op(
    name: str,
    schema: str,
    reference: Callable,
    fake: Callable,
    differentiable: Sequence[int],
    *,
    stem: str,
    kernels: Sequence[str] = ("cpp", "cuda", "triton"),
    public: bool = True,
):
    """Register torch.ops.sparsemem.<name>: its declaration and every backend's kernel, in one call.

    schema: the argument and return part of a torch schema, e.g. "(Tensor usage) -> Tensor".
    stem: the op family's file stem (ops/<stem>.py, kernels/<stem>.py, csrc/*/<stem>.*); kernels:
    the backends with kernel sources besides torch (the reference, differentiated by vjp): triton's
    <name>_forward / <name>_backward in kernels/<stem>.py, cpp and cuda's ext_<name> in csrc/.
    public: False for an op that sparsemem's modules call but sparsemem.ops does not export.
    Every tensor input has B first; with B = 0 the op returns fake's (empty) outputs and zero
    (empty) gradients without running a backend, so every backend agrees on an empty batch.
    Returns a function of the op's inputs: inside torch.compile it calls the registered custom op
    (traced through its fake and autograd registrations); in eager mode it runs the same kernel
    and backward through a plain torch.autograd.Function, skipping the custom op's dispatch, which
    costs more than the whole kernel at the sizes of a sparse step (~100 us a call on 2 cores).
    """
    declare_op(name, stem, schema, differentiable, kernels, public)
    _backends.register(name, "torch", torch_kernel(reference, differentiable))
    _register_extension(name, schema, differentiable, kernels)
    if "triton" in kernels:
        _backends.register(name, "triton", triton_kernel(stem, name, differentiable))

    def run_forward(*inputs):
        if _empty_batch(inputs):
            return fake(*inputs)  # empty outputs of the right shapes and dtypes; no kernel sees B = 0
        return _backends.kernel(name, _device(inputs)).forward(*inputs)

    def setup_context(ctx, inputs, output):
        outputs = output if isinstance(output, tuple) else (output,)
        tensor_positions = [i for i, value in enumerate(inputs) if isinstance(value, Tensor)]
        ctx.constants = {i: value for i, value in enumerate(inputs) if not isinstance(value, Tensor)}
        ctx.tensor_positions = tensor_positions
        ctx.save_for_backward(*(inputs[i] for i in tensor_positions), *outputs)

    def run_backward(ctx, *grads):
        saved = ctx.saved_tensors
        inputs = [None] * (len(ctx.tensor_positions) + len(ctx.constants))
        for position, value in zip(ctx.tensor_positions, saved, strict=False):
            inputs[position] = value
        for position, value in ctx.constants.items():
            inputs[position] = value
        outputs = saved[len(ctx.tensor_positions) :]
        if _empty_batch(inputs):
            return tuple(torch.zeros_like(inputs[i]) if i in differentiable else None for i in range(len(inputs)))
        kernel = _backends.kernel(name, _device(inputs))
        return kernel.backward(grads, inputs, outputs)

    op = torch.library.custom_op(f"sparsemem::{name}", run_forward, mutates_args=(), schema=schema)
    op.register_fake(fake)
    op.register_autograd(run_backward, setup_context=setup_context)

    def eager_forward(ctx, *inputs):
        output = run_forward(*inputs)
        setup_context(ctx, inputs, output)
        return output

    # forward(ctx, ...) rather than a setup_context staticmethod: with one, every apply binds the
    # arguments through inspect.signature, which alone costs ~20 us. Named after the op, so
    # profiles show sparsemem_<name> and sparsemem_<name>Backward.
    eager = type(
        f"sparsemem_{name}",
        (torch.autograd.Function,),
        {"forward": staticmethod(eager_forward), "backward": staticmethod(run_backward)},
    )

    direct = _differentiated_in_cpp(name)

    def call(*inputs):
        if torch.compiler.is_compiling():
            return op(*inputs)
        if direct is not None and _backends.backend_for(name, _device(inputs)) == "cpp" and not _empty_batch(inputs):
            return direct(*inputs)
        return eager.apply(*inputs)

    return call


def _differentiated_in_cpp(name: str) -> Callable | None:
    """torch.ops.sparsemem.ext_<name> when the extension registers its autograd in C++ as well
    (csrc/cpu/autograd.h), else None. Eager calls on the cpp backend go straight to it: one C++ node
    and no Python in its backward, where the autograd.Function below costs ~100 us a call more."""
    if not _has_extension_op(name):
        return None
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"sparsemem::ext_{name}", "Autograd"):
        return None
    return getattr(torch.ops.sparsemem, f"ext_{name}").default


def _empty_batch(inputs: Sequence[object]) -> bool:
    """B = 0: every op's tensor inputs, and so its outputs, have B first."""
    return next(value for value in inputs if isinstance(value, Tensor)).shape[0] == 0


def _device(inputs: Sequence[object]) -> torch.device:
    return next(value.device for value in inputs if isinstance(value, Tensor))
