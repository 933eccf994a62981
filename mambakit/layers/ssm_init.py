"""Initializations shared by the Mamba layers: the time-step bias and the no-weight-decay mark."""

from __future__ import annotations

import math

import torch
from torch import nn

from mambakit.ops._checks import FLOAT_DTYPES


def dt_bias_init(
    size: int, dt_min: float, dt_max: float, dt_init_floor: float, device=None, dtype=None
) -> torch.Tensor:
    """A bias b with softplus(b) = dt, dt log-uniform in [dt_min, dt_max] and at least dt_init_floor.

    The layers pass this bias to the scan with dt_softplus=True, so the initial step sizes are dt.
    """
    if not 0 < dt_min <= dt_max:
        raise ValueError(f"dt_min and dt_max must satisfy 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
    u = torch.rand(size, device=device, dtype=torch.float32)
    dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_init_floor)
    # inverse of softplus: log(exp(dt) - 1) = dt + log(1 - exp(-dt)), stable for small dt
    return (dt + torch.log(-torch.expm1(-dt))).to(dtype or torch.float32)


def no_weight_decay(*params: nn.Parameter) -> None:
    """Mark parameters that the optimizer groups exclude from weight decay (A_log, D, dt bias, norms)."""
    for p in params:
        p._no_weight_decay = True


def no_reinit(*params: nn.Parameter) -> None:
    """Mark parameters whose layer-specific init the model-wide init must keep."""
    for p in params:
        p._no_reinit = True


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Recurrent state and A are float32 (float64 when the layer itself is float64, e.g. for gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def cache_ssm_dtype(layer_dtype: torch.dtype, ssm_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of a decoding cache's SSM state: `ssm_dtype` when given (bfloat16 / float16 halve the
    state's memory; steps still run in float32), else `state_dtype(layer_dtype)`."""
    if ssm_dtype is None:
        return state_dtype(layer_dtype)
    if ssm_dtype not in FLOAT_DTYPES:
        raise ValueError(f"ssm_dtype must be float16, bfloat16, float32, float64 or None, got {ssm_dtype!r}")
    return ssm_dtype
