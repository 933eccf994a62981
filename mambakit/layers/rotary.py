"""Rotary position embedding (Su et al. 2021), rotate-half form, on the first `rotary_dim` features."""

from __future__ import annotations

import torch


def rotary_cos_sin(
    positions: torch.Tensor, rotary_dim: int, theta: float = 10000.0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (batch, seqlen) integer -> cos, sin (batch, seqlen, rotary_dim // 2) in `dtype`
    (float32, or float64 for a float64 model)."""
    inv_freq = theta ** (-torch.arange(0, rotary_dim, 2, device=positions.device, dtype=dtype) / rotary_dim)
    angles = positions.to(dtype)[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + rotary_dim / 2) of the first rotary_dim features of each head.

    x (batch, seqlen, nheads, head_dim); cos, sin (batch, seqlen, rotary_dim // 2). Computed in cos's
    dtype, returned in x's dtype; features past rotary_dim pass through.
    """
    half = cos.shape[-1]
    rot, rest = x[..., : 2 * half], x[..., 2 * half :]
    x1, x2 = rot.to(cos.dtype).chunk(2, dim=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
    return torch.cat([rotated, rest], dim=-1)
