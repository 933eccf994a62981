"""Normalization modules: RMSNorm and Mamba-2's gated, grouped RMSNorm (thin wrappers over ops.norm)."""

from __future__ import annotations

import torch
from torch import nn

from mambakit import ops


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last axis; x (..., dim)."""

    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.weight._no_weight_decay = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class GatedRMSNorm(nn.Module):
    """Mamba-2's output norm: RMSNorm over groups of `group_size` channels, gated by silu(z).

    x, z (..., dim). norm_before_gate=False: norm(x * silu(z)) * weight; True: norm(x) * weight * silu(z).
    """

    def __init__(
        self,
        dim: int,
        eps: float = 1e-5,
        group_size: int | None = None,
        norm_before_gate: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.eps = eps
        self.group_size = group_size or dim
        self.norm_before_gate = norm_before_gate
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.weight._no_weight_decay = True

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return ops.gated_rms_norm(x, z, self.weight, self.eps, self.group_size, self.norm_before_gate)
