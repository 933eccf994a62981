"""Triton backend of the linear cross-entropy: the torch backend's chunk loop and cuBLAS matmuls, with
the row statistics and the softmax gradient as fused Triton kernels (interpreted on CPU)."""

from mambakit.ops.cross_entropy.triton.functions import ROW_OPS, linear_cross_entropy_impl

__all__ = ["ROW_OPS", "linear_cross_entropy_impl"]
