"""Triton backend of the causal depthwise conv1d: fused GPU kernels (run by Triton's interpreter on CPU)."""

from mambakit.ops.conv1d.triton.functions import causal_conv1d_impl, causal_conv1d_update_impl

__all__ = ["causal_conv1d_impl", "causal_conv1d_update_impl"]
