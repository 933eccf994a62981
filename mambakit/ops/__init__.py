"""The math of mambakit: plain functions on tensors, one dispatching entry per op (`backend=`)."""

from mambakit.ops._backend import BACKENDS, resolve_backend, triton_available
from mambakit.ops.conv1d import causal_conv1d, causal_conv1d_update
from mambakit.ops.cross_entropy import linear_cross_entropy
from mambakit.ops.mamba1_step import mamba1_block_step
from mambakit.ops.mamba2_step import mamba2_block_step
from mambakit.ops.norm import add_rms_norm, gated_rms_norm, rms_norm
from mambakit.ops.selective_scan import selective_scan, selective_state_update
from mambakit.ops.ssd import cu_seqlens_to_seq_idx, ssd, ssd_state_update

__all__ = [
    "BACKENDS",
    "resolve_backend",
    "triton_available",
    "selective_scan",
    "selective_state_update",
    "ssd",
    "ssd_state_update",
    "cu_seqlens_to_seq_idx",
    "causal_conv1d",
    "causal_conv1d_update",
    "rms_norm",
    "gated_rms_norm",
    "add_rms_norm",
    "linear_cross_entropy",
    "mamba1_block_step",
    "mamba2_block_step",
]
