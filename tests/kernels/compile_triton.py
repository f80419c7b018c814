"""Compiles every Triton kernel of sparsemem.kernels to a cubin for sm_90, without a GPU.

    python -m tests.kernels.compile_triton [float32,bfloat16,float64]

Runs each op's triton forward and backward on small CPU tensors with kernel launches
replaced by a recorder, then compiles each distinct launch (argument types and constexprs)
with triton.compile for an H100 target. The interpreter (TRITON_INTERPRET=1) accepts code the
GPU compiler rejects; this catches that here. Must run with TRITON_INTERPRET unset.
"""

import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from sparsemem import _backends, reference
from sparsemem.testing import op_inputs

TARGET = GPUTarget("cuda", 90, 32)
TRITON_OPS = [op for op in _backends.ops() if "triton" in _backends.op_info(op).backends]
TYPES = {
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.uint8: "u8",
}


def _type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no triton type for {type(value).__name__}")


def record_launches(dtypes: list[torch.dtype]) -> dict:
    """{(kernel name, signature, constexprs): (kernel, signature, constexprs)} of every launch."""
    launches = {}

    def record(self, *args, grid, warmup, **kwargs):
        bound = dict(zip(self.arg_names, args, strict=False)) | kwargs
        signature, constexprs = {}, {}
        for param in self.params:
            if param.is_constexpr:
                signature[param.name] = "constexpr"
                constexprs[param.name] = bound[param.name]
            else:
                signature[param.name] = _type(bound[param.name])
        key = (self.__name__, tuple(signature.items()), tuple(sorted(constexprs.items())))
        launches[key] = (self, signature, constexprs)

    original = JITFunction.run
    JITFunction.run = record
    try:
        import importlib

        for op in TRITON_OPS:
            module = importlib.import_module(f"sparsemem.kernels.{_backends.op_info(op).stem}")
            for dtype in dtypes:
                inputs = op_inputs(op, dtype, B=2, N=40, W=5, R=3)
                getattr(module, f"{op}_forward")(*inputs)
                if not hasattr(module, f"{op}_backward"):
                    continue  # journaled_write: its backward is composed around sparse_write's kernels
                # recorded launches write nothing: the backward gets the reference's outputs
                # (valid indices for the torch ops around the kernels)
                outputs = getattr(reference, f"{op}_ref")(*inputs)
                outputs = outputs if isinstance(outputs, tuple) else (outputs,)
                # as sparsemem.ops._define.triton_kernel calls it: grads of the float outputs,
                # the tensor inputs
                grads = [torch.ones(o.shape, dtype=dtype) for o in outputs if o.is_floating_point()]
                tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
                getattr(module, f"{op}_backward")(grads, tensors, outputs)
            if op == "allocation_weights":  # the multi-tile path as well
                (usage,) = op_inputs("allocation_weights", dtypes[0], B=2, N=40)
                out = module.allocation_weights_forward(usage, block=16)
                module.allocation_weights_backward([torch.ones_like(out)], [usage], [out], block=16)
    finally:
        JITFunction.run = original
    return launches


def main(argv: list[str]) -> int:
    dtypes = [getattr(torch, name) for name in (argv[0] if argv else "float32,bfloat16").split(",")]
    launches = record_launches(dtypes)
    for kernel, signature, constexprs in launches.values():
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=TARGET)
        assert compiled.asm["cubin"], kernel.__name__
    names = sorted({kernel.__name__ for kernel, _, _ in launches.values()})
    print(f"compiled {len(launches)} launches of {len(names)} kernels for sm_90: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
