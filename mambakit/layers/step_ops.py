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
