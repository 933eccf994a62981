"""Reference RMSNorm, gated RMSNorm (grouped) and residual-add + RMSNorm: the plain formulas.

Computed in float32 (float64 for float64 inputs); outputs in x's dtype. See `norm/__init__.py` for the
public contract.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float32, or float64 when an input is float64 (so that gradcheck sees full precision)."""
    return (
        torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
    )


def _normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) over the last axis."""
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


def rms_norm_impl(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., dim); weight (dim,). Returns (..., dim) in x's dtype."""
    acc = compute_dtype(x, weight)
    return (_normalize(x.to(acc), eps) * weight.to(acc)).to(x.dtype)


def gated_rms_norm_impl(
    x: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    group_size: int,
    norm_before_gate: bool,
) -> torch.Tensor:
    """x, z (..., dim); weight (dim,); each run of `group_size` channels is normalized on its own.
    Returns (..., dim) in x's dtype."""
    acc = compute_dtype(x, z, weight)
    h, gate = x.to(acc), F.silu(z.to(acc))
    if not norm_before_gate:
        h = h * gate
    h = _normalize(h.unflatten(-1, (-1, group_size)), eps).flatten(-2)  # (..., ngroups, group_size) inside
    h = h * weight.to(acc)
    if norm_before_gate:
        h = h * gate
    return h.to(x.dtype)


def add_rms_norm_impl(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    residual_in_fp32: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual (..., dim); weight (dim,). Returns (normed in x's dtype, residual_out): the sum
    x + residual, in float32 if residual_in_fp32 (float64 inputs stay float64) else in x's dtype.
    The norm reads the unrounded sum, as a fused kernel does."""
    acc = compute_dtype(x, residual, weight)
    total = x.to(acc) if residual is None else x.to(acc) + residual.to(acc)
    normed = (_normalize(total, eps) * weight.to(acc)).to(x.dtype)
    return normed, total.to(residual_dtype(x.dtype, residual_in_fp32))


def residual_dtype(x_dtype: torch.dtype, residual_in_fp32: bool) -> torch.dtype:
    return torch.promote_types(x_dtype, torch.float32) if residual_in_fp32 else x_dtype
