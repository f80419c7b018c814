"""Triton kernels, installed as sparsemem.kernels; imported lazily by the triton backend."""
