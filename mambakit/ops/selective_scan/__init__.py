"""Mamba-1 selective scan (S6): the one public entry and its one-token step.

Backends live beside this file: `reference.py` (sequential recurrence, the definition), `torch.py`
(chunked, vectorized PyTorch) and `triton/` (fused GPU kernels). Each defines `selective_scan_impl`
and `selective_state_update_impl` with the arguments below (minus `backend`), already checked.
"""

from mambakit.ops.selective_scan.api import selective_scan, selective_state_update

__all__ = ["selective_scan", "selective_state_update"]
