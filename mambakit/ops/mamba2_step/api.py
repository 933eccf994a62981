"""The decoding step of a whole pre-norm Mamba-2 block as one op: the entry `mamba2_block_step`."""

from __future__ import annotations

import math

import torch

from mambakit.ops._backend import BackendModules, resolve_backend
from mambakit.ops._checks import check_divides, check_optional, check_positive_float, check_tensor

_impl = BackendModules(__package__)
_IMPLEMENTED = _impl.implemented


def mamba2_block_step(
    hidden: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    norm_eps: float,
    residual_in_fp32: bool,
    in_proj_weight: torch.Tensor,
    conv_state: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    dt_bias: torch.Tensor,
    A_log: torch.Tensor,
    D: torch.Tensor | None,
    dt_limit: tuple[float, float],
    ssm_state: torch.Tensor,
    ngroups: int,
    gate_norm_weight: torch.Tensor,
    gate_norm_eps: float,
    gate_group_size: int,
    norm_before_gate: bool,
    out_proj_weight: torch.Tensor,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token through a pre-norm Mamba-2 block (`layers.Block` around `layers.Mamba2`, no in/out
    projection biases); advances `conv_state` and `ssm_state` in place.

    Math, per batch row (as the block's unfused step, with its roundings to hidden's dtype):
        residual_out = hidden + residual (hidden alone if residual is None)
        z, xBC, dt = split(in_proj_weight @ rmsnorm(residual_out) * norm_weight)
        x, B, C = split(silu(causal conv of (conv_state, xBC))); conv_state shifts in xBC
        delta = clamp(softplus(dt + dt_bias), *dt_limit);  h = exp(-delta exp(A_log)) h + delta x B^T
        y = h C + D x;  y = gated_rms_norm(y, z) (groups of gate_group_size channels)
        out = out_proj_weight @ y
    Shapes: hidden, residual (batch, d_model); in_proj_weight (2 d_inner + 2 ngroups dstate + nheads,
    d_model); conv_state (batch, conv_dim, d_conv - 1), conv_weight (conv_dim, d_conv), conv_bias
    (conv_dim,) with conv_dim = d_inner + 2 ngroups dstate; dt_bias, A_log (nheads,); D (nheads,) or
    (nheads, headdim); ssm_state (batch, nheads, headdim, dstate), float32 or half; gate_norm_weight
    (d_inner,); out_proj_weight (d_model, d_inner); d_inner = nheads * headdim.
    Returns (out (batch, d_model) in hidden's dtype, residual_out (batch, d_model), float32 if
    residual_in_fp32 else hidden's dtype). Backends "reference", "torch", "triton" ("auto": "triton"
    for CUDA tensors, else "torch"). No autograd: this is a decoding op.
    """
    check_tensor("hidden", hidden, (None, None))
    batch, d_model = hidden.shape
    dev = hidden.device
    check_optional("residual", residual, (batch, d_model), device=dev)
    check_tensor("norm_weight", norm_weight, (d_model,), device=dev)
    norm_eps = check_positive_float("norm_eps", norm_eps)
    gate_norm_eps = check_positive_float("gate_norm_eps", gate_norm_eps)
    check_tensor("ssm_state", ssm_state, (batch, None, None, None), device=dev)
    _, nheads, headdim, dstate = ssm_state.shape
    d_inner = nheads * headdim
    if isinstance(ngroups, bool) or not isinstance(ngroups, int) or ngroups <= 0:
        raise ValueError(f"ngroups must be a positive int, got {ngroups!r}")
    check_divides("ngroups", ngroups, "nheads (ssm_state.shape[1])", nheads)
    conv_dim = d_inner + 2 * ngroups * dstate
    check_tensor("conv_weight", conv_weight, (conv_dim, None), device=dev)
    d_conv = conv_weight.shape[1]
    if d_conv < 2:
        raise ValueError(f"conv_weight must have d_conv >= 2 taps (shape (conv_dim, d_conv)), got {d_conv}")
    check_tensor("in_proj_weight", in_proj_weight, (d_inner + conv_dim + nheads, d_model), device=dev)
    check_tensor("conv_state", conv_state, (batch, conv_dim, d_conv - 1), device=dev)
    check_optional("conv_bias", conv_bias, (conv_dim,), device=dev)
    check_tensor("dt_bias", dt_bias, (nheads,), device=dev)
    check_tensor("A_log", A_log, (nheads,), device=dev)
    if D is not None:
        check_tensor("D", D, (nheads,) if D.ndim == 1 else (nheads, headdim), device=dev)
    lo, hi = dt_limit
    if not (0 <= lo <= hi and not math.isnan(hi)):
        raise ValueError(f"dt_limit must be (low, high) with 0 <= low <= high, got {dt_limit!r}")
    check_tensor("gate_norm_weight", gate_norm_weight, (d_inner,), device=dev)
    if isinstance(gate_group_size, bool) or not isinstance(gate_group_size, int) or gate_group_size <= 0:
        raise ValueError(f"gate_group_size must be a positive int, got {gate_group_size!r}")
    check_divides("gate_group_size", gate_group_size, "d_inner", d_inner)
    check_tensor("out_proj_weight", out_proj_weight, (d_model, d_inner), device=dev)
    for name, w in (("in_proj_weight", in_proj_weight), ("out_proj_weight", out_proj_weight),
                    ("conv_state", conv_state)):  # fmt: skip
        if w.dtype != hidden.dtype:
            raise TypeError(f"{name} must have hidden's dtype {hidden.dtype}, got {w.dtype}")
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, residual, in_proj_weight, out_proj_weight)
    ):
        raise ValueError("mamba2_block_step is a decoding op without autograd: call it under torch.no_grad()")
    name = resolve_backend(backend, dev, _IMPLEMENTED)
    return _impl(name).mamba2_block_step_impl(
        hidden, residual, norm_weight, norm_eps, bool(residual_in_fp32), in_proj_weight, conv_state,
        conv_weight, conv_bias, dt_bias, A_log, D, (float(lo), float(hi)), ssm_state, ngroups,
        gate_norm_weight, gate_norm_eps, gate_group_size, bool(norm_before_gate), out_proj_weight,
    )  # fmt: skip


__all__ = ["mamba2_block_step"]
