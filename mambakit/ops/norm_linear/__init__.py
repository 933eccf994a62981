"""An RMS norm fused with the linear layer it feeds, for one-token decoding steps.

Backends: `reference.py`, `torch.py`, `triton/`; each defines `add_rms_norm_linear_impl` and
`gated_rms_norm_linear_impl` with the arguments of the public entries (minus `backend`), already checked.
"""

from mambakit.ops.norm_linear.api import add_rms_norm_linear, gated_rms_norm_linear

__all__ = ["add_rms_norm_linear", "gated_rms_norm_linear"]
