"""RMSNorm, gated RMSNorm (grouped) and fused residual-add + RMSNorm: the public entries.

Backends: `reference.py`, `torch.py`, `triton/`; each defines `rms_norm_impl`, `gated_rms_norm_impl`
and `add_rms_norm_impl` with the arguments below (minus `backend`), already checked.
All compute in float32 and return the input's dtype.
"""

from mambakit.ops.norm.api import add_rms_norm, gated_rms_norm, rms_norm

__all__ = ["rms_norm", "gated_rms_norm", "add_rms_norm"]
