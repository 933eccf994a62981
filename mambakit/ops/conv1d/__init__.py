"""Causal depthwise conv1d (+ SiLU) with conv state in and out: the one public entry and its step.

Backends: `reference.py`, `torch.py`, `triton/`; each defines `causal_conv1d_impl` and
`causal_conv1d_update_impl` with the arguments below (minus `backend`), already checked.
"""

from mambakit.ops.conv1d.api import causal_conv1d, causal_conv1d_update

__all__ = ["causal_conv1d", "causal_conv1d_update"]
