"""Triton backend of norm + linear: one GEMV kernel with the norm inside, for decoding steps."""

from mambakit.ops.norm_linear.triton.ops import add_rms_norm_linear_impl, gated_rms_norm_linear_impl

__all__ = ["add_rms_norm_linear_impl", "gated_rms_norm_linear_impl"]
