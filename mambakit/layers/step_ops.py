"""The ops a one-token decoding step calls, resolved once per step instead of once per op call.

At batch 1 on CPU a decoding step is bound by per-op overhead: each public op entry checks every
argument's shape, dtype and device and resolves `backend=` (tens of microseconds of Python per call,
~1-2 ms per token over a 24-layer model). The layers' step methods build their arguments themselves
from their own parameters and cache, so on CPU with the PyTorch backend (`backend="auto"`, no
`MAMBAKIT_BACKEND` override or `"torch"`) they call the backend's implementations directly, with the
same positional arguments as the public entries. Everywhere else (GPU, an explicit backend choice)
the checked public entries are used, so behaviour there is unchanged.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch

from mambakit import ops
from mambakit.layers.packing import check_hidden
from mambakit.ops.conv1d import torch as _conv_torch
from mambakit.ops.norm import torch as _norm_torch
from mambakit.ops.selective_scan import torch as _scan_torch
from mambakit.ops.ssd import torch as _ssd_torch

_PUBLIC = SimpleNamespace(
    causal_conv1d_update=ops.causal_conv1d_update,
    selective_state_update=ops.selective_state_update,
    ssd_state_update=ops.ssd_state_update,
    add_rms_norm=ops.add_rms_norm,
    gated_rms_norm=ops.gated_rms_norm,
)
_TORCH_BACKEND = SimpleNamespace(
    causal_conv1d_update=_conv_torch.causal_conv1d_update_impl,
    selective_state_update=_scan_torch.selective_state_update_impl,
    ssd_state_update=_ssd_torch.ssd_state_update_impl,
    add_rms_norm=_norm_torch.add_rms_norm_impl,
    gated_rms_norm=_norm_torch.gated_rms_norm_impl,
)


def step_ops(hidden_states: torch.Tensor) -> SimpleNamespace:
    """The step ops for `hidden_states`' device: the torch backend's implementations (unchecked)
    on CPU when the backend resolves to "torch", else the public, checked entries."""
    if hidden_states.device.type == "cpu" and os.environ.get("MAMBAKIT_BACKEND", "auto") in ("auto", "torch"):
        return _TORCH_BACKEND
    return _PUBLIC


# Up to batch max(1, mixer.fused_step_batch_width // d_model) a decoding step of a Mamba block runs as
# one fused op (`ops.mamba1_block_step`, `ops.mamba2_block_step`) on the GPU. Its kernels read a block's
# weights once per batch row; the unfused step's cuBLAS GEMMs read them once for all rows, and win from
# a batch that grows as the model shrinks (H200, bf16: fused faster at batch 1-4 for Mamba-1 130M and
# 1-2 for Mamba-2 130M, at batch 1 for the 1.3B/1.4B; `benchmarks/gpu_block_step.py`): widths 3072
# (Mamba-1) and 2048 (Mamba-2).


def fused_step_applies(
    mixer: torch.nn.Module, hidden: torch.Tensor, residual: torch.Tensor | None, cache
) -> bool:
    """Whether a Mamba mixer's block step may run as its fused op: the Triton backend is chosen (CUDA
    tensors; or MAMBAKIT_BACKEND=triton under the interpreter), the batch is small (above), the
    in/out projections have no bias, the conv has >= 2 taps, no autograd or autocast, and weights,
    input and conv state share a dtype. MAMBAKIT_FUSED_STEP=0 turns it off."""
    if os.environ.get("MAMBAKIT_FUSED_STEP", "1") == "0" or hidden.ndim != 3:
        return False
    if hidden.shape[0] > max(1, mixer.fused_step_batch_width // mixer.d_model) or mixer.d_conv < 2:
        return False
    if mixer.in_proj.bias is not None or mixer.out_proj.bias is not None:
        return False
    if ops.resolve_backend("auto", hidden.device, ops.BACKENDS) != "triton":
        return False
    if torch.is_grad_enabled() and any(p.requires_grad for p in mixer.parameters()):
        return False
    if torch.is_autocast_enabled(hidden.device.type):
        return False
    dtype = hidden.dtype
    return (
        mixer.in_proj.weight.dtype == dtype
        and cache.conv_state.dtype == dtype
        and (residual is None or residual.shape == hidden.shape)
    )


def fused_block_step(op, d_model: int, hidden: torch.Tensor, residual: torch.Tensor | None, cache, *args):
    """A block's step through a fused block-step op, called as op(hidden (batch, d_model), residual
    (batch, d_model) or None, *args): hidden and residual (batch, 1, d_model) in and out, as
    `Block.step`; advances the mixer's cache counter."""
    check_hidden(hidden, d_model, step=True)
    out, residual = op(hidden[:, 0], None if residual is None else residual[:, 0], *args)
    cache.seqlen_offset += 1
    return out.unsqueeze(1), residual.unsqueeze(1)
