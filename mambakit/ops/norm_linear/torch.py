"""PyTorch backend of norm + linear: the PyTorch norm, then `F.linear` (one GEMM, as the layers do)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mambakit.ops.norm import torch as norm


def add_rms_norm_linear_impl(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    residual_in_fp32: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See `reference.add_rms_norm_linear_impl`."""
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
    """See `reference.gated_rms_norm_linear_impl`."""
    normed = norm.gated_rms_norm_impl(x, z, norm_weight, eps, group_size, norm_before_gate)
    return F.linear(normed, weight, bias)
