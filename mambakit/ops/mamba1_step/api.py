"""The decoding step of a whole pre-norm Mamba-1 block as one op: the entry `mamba1_block_step`."""

from __future__ import annotations

import torch

from mambakit.ops._backend import BackendModules, resolve_backend
from mambakit.ops._checks import check_optional, check_positive_float, check_tensor

_impl = BackendModules(__package__)
_IMPLEMENTED = _impl.implemented


def mamba1_block_step(
    hidden: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    norm_eps: float,
    residual_in_fp32: bool,
    in_proj_weight: torch.Tensor,
    conv_state: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    x_proj_weight: torch.Tensor,
    dt_proj_weight: torch.Tensor,
    dt_bias: torch.Tensor,
    A_log: torch.Tensor,
    D: torch.Tensor | None,
    ssm_state: torch.Tensor,
    out_proj_weight: torch.Tensor,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token through a pre-norm Mamba-1 block (`layers.Block` around `layers.Mamba1`, no in/out
    projection biases); advances `conv_state` and `ssm_state` in place.

    Math, per batch row (as the block's unfused step, with its roundings to hidden's dtype):
        residual_out = hidden + residual (hidden alone if residual is None)
        x, z = split(in_proj_weight @ rmsnorm(residual_out) * norm_weight)
        x = silu(causal conv of (conv_state, x) with conv_weight, conv_bias); conv_state shifts in x
        dt_low, B, C = split(x_proj_weight @ x);  delta = softplus(dt_proj_weight @ dt_low + dt_bias)
        h = exp(-delta exp(A_log)) h + delta B x;  y = (C h + D x) silu(z)
        out = out_proj_weight @ y
    Shapes: hidden, residual (batch, d_model); norm_weight (d_model,); in_proj_weight
    (2 * d_inner, d_model); conv_state (batch, d_inner, d_conv - 1); conv_weight (d_inner, d_conv);
    conv_bias, dt_bias, D (d_inner,); x_proj_weight (dt_rank + 2 * dstate, d_inner); dt_proj_weight
    (d_inner, dt_rank); A_log (d_inner, dstate); ssm_state (batch, d_inner, dstate), float32 or half;
    out_proj_weight (d_model, d_inner).
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
    check_tensor("conv_weight", conv_weight, (None, None), device=dev)
    d_inner, d_conv = conv_weight.shape
    if d_conv < 2:
        raise ValueError(f"conv_weight must have d_conv >= 2 taps (shape (d_inner, d_conv)), got {d_conv}")
    check_tensor("in_proj_weight", in_proj_weight, (2 * d_inner, d_model), device=dev)
    check_tensor("conv_state", conv_state, (batch, d_inner, d_conv - 1), device=dev)
    check_optional("conv_bias", conv_bias, (d_inner,), device=dev)
    check_tensor("dt_proj_weight", dt_proj_weight, (d_inner, None), device=dev)
    check_tensor("A_log", A_log, (d_inner, None), device=dev)
    dt_rank, dstate = dt_proj_weight.shape[1], A_log.shape[1]
    check_tensor("x_proj_weight", x_proj_weight, (dt_rank + 2 * dstate, d_inner), device=dev)
    check_tensor("dt_bias", dt_bias, (d_inner,), device=dev)
    check_optional("D", D, (d_inner,), device=dev)
    check_tensor("ssm_state", ssm_state, (batch, d_inner, dstate), device=dev)
    check_tensor("out_proj_weight", out_proj_weight, (d_model, d_inner), device=dev)
    for name, w in (("in_proj_weight", in_proj_weight), ("x_proj_weight", x_proj_weight),
                    ("out_proj_weight", out_proj_weight), ("conv_state", conv_state)):  # fmt: skip
        if w.dtype != hidden.dtype:
            raise TypeError(f"{name} must have hidden's dtype {hidden.dtype}, got {w.dtype}")
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, residual, in_proj_weight, out_proj_weight)
    ):
        raise ValueError("mamba1_block_step is a decoding op without autograd: call it under torch.no_grad()")
    name = resolve_backend(backend, dev, _IMPLEMENTED)
    return _impl(name).mamba1_block_step_impl(
        hidden, residual, norm_weight, norm_eps, bool(residual_in_fp32), in_proj_weight, conv_state,
        conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_bias, A_log, D, ssm_state,
        out_proj_weight,
    )  # fmt: skip


__all__ = ["mamba1_block_step"]
