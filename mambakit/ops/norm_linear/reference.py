"""Reference norm + linear: the norm's reference, its output rounded to x's dtype, then `F.linear`.

The rounding is part of the contract: it is what the unfused layers compute (the norm returns x's
dtype, the linear layer reads it), so a fused kernel and the layers' full forward agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mambakit.ops.norm import reference as norm


def add_rms_norm_linear_impl(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    residual_in_fp32: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual (..., in_features) -> (linear(add_rms_norm(x, residual)) (..., out_features), residual)."""
    normed, residual = norm.add_rms_norm_impl(x, residual, norm_weight, eps, residual_in_fp32)
    return F.linear(normed, weight, bias), residual


def gated_rms_norm_linear_impl(
    x: torch.Tensor,
    z: torch.Tensor,
    norm_weight: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    group_size: int,
    norm_before_gate: bool,
) -> torch.Tensor:
    """x, z (..., in_features) -> linear(gated_rms_norm(x, z)) (..., out_features)."""
    normed = norm.gated_rms_norm_impl(x, z, norm_weight, eps, group_size, norm_before_gate)
    return F.linear(normed, weight, bias)
