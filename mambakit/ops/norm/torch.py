"""PyTorch backend of the norms: the reference's math, reused as is.

The reference is already one vectorized expression per norm; `F.rms_norm` measured no faster on CPU
(it decomposes to the same ops), so there is nothing to rearrange. Autograd by PyTorch.
"""

from mambakit.ops.norm.reference import add_rms_norm_impl, gated_rms_norm_impl, rms_norm_impl

__all__ = ["rms_norm_impl", "gated_rms_norm_impl", "add_rms_norm_impl"]
