"""Triton backend of the RMS norms: fused GPU kernels (run by Triton's interpreter on CPU)."""

from mambakit.ops.norm.triton.functions import add_rms_norm_impl, gated_rms_norm_impl, rms_norm_impl

__all__ = ["rms_norm_impl", "gated_rms_norm_impl", "add_rms_norm_impl"]
