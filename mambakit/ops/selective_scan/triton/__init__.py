"""Triton backend of the Mamba-1 selective scan: fused forward and backward kernels and the one-token step.

Importing this package needs Triton but no GPU: the kernels compile on first launch (or run on the CPU
through Triton's interpreter when TRITON_INTERPRET=1).
"""

from mambakit.ops.selective_scan.triton.autograd import selective_scan_impl
from mambakit.ops.selective_scan.triton.state_update import selective_state_update_impl

__all__ = ["selective_scan_impl", "selective_state_update_impl"]
