"""Initializations shared by the Mamba layers: the time-step bias and the no-weight-decay mark."""

from __future__ import annotations

import math

import torch
from torch import nn


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


def decay_rates(module: nn.Module) -> torch.Tensor:
    """A = -exp(A_log) in the state dtype, for `module.A_log` (any shape).

    Decoding calls every layer's step once per token with the same A_log, and at batch 1 on CPU the
    two ops that form A are a measurable part of a step, so without autograd A is kept on the module
    and rebuilt only when A_log changes: an in-place update (optimizer step, `load_state_dict`)
    bumps the tensor's version counter, a move or `.data` swap its storage. With autograd enabled A
    is computed fresh so that gradients reach A_log.
    """
    A_log = module.A_log
    # inference tensors (a layer built under inference_mode) have no version counter to watch
    if torch.is_grad_enabled() or A_log.is_inference():
        return -torch.exp(A_log.to(state_dtype(A_log.dtype)))
    key = (A_log._version, A_log.data_ptr(), A_log.dtype, A_log.device, tuple(A_log.shape))
    cached = module.__dict__.get("_decay_rates_cache")
    stale = cached is None or cached[0] != key
    # an A made under inference_mode may not be used by ops outside it that autograd could see
    if stale or (cached[1].is_inference() and not torch.is_inference_mode_enabled()):
        cached = (key, -torch.exp(A_log.detach().to(state_dtype(A_log.dtype))))
        module.__dict__["_decay_rates_cache"] = cached
    return cached[1]
