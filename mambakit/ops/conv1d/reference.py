"""Reference causal depthwise conv1d: one shifted multiply-add per tap, written to be read.

This file is the definition the other backends are tested against (see `conv1d/__init__.py` for the
public contract). Layout inside: time on axis 1, like the public `(batch, seqlen, dim)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or float64 when an input is float64 (so that gradcheck sees full precision)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    return F.silu(y) if activation == "silu" else y


def extended_doc_ids(seq_idx: torch.Tensor, width: int) -> torch.Tensor:
    """(batch, seqlen) document ids -> (batch, width - 1 + seqlen): the width-1 positions before 0
    (where initial_state lives) belong to the row's first document."""
    first = seq_idx[:, :1].expand(-1, width - 1)
    return torch.cat([first, seq_idx], dim=1)


def causal_conv1d_impl(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None,
    initial_state: torch.Tensor | None,
    return_final_state: bool,
    seq_idx: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x (batch, seqlen, dim); weight (dim, width); initial_state (batch, dim, width - 1).
    Returns out (batch, seqlen, dim) in x's dtype and the final state (batch, dim, width - 1) or None."""
    batch, seqlen, dim = x.shape
    width = weight.shape[1]
    acc = compute_dtype(x, weight)
    if initial_state is None:
        past = x.new_zeros(batch, width - 1, dim, dtype=acc)
    else:
        past = initial_state.transpose(1, 2).to(acc)
    # xs[:, j] is the input at position j - (width - 1): the state first, then x
    xs = torch.cat([past, x.to(acc)], dim=1)  # (batch, width - 1 + seqlen, dim)
    doc = None if seq_idx is None else extended_doc_ids(seq_idx, width)

    out = torch.zeros(batch, seqlen, dim, dtype=acc, device=x.device)
    if bias is not None:
        out = out + bias.to(acc)
    for k in range(width):
        # tap k of output t reads the input at t - (width - 1) + k, i.e. xs[:, t + k]
        tap = xs[:, k : k + seqlen]
        if doc is not None:
            same_doc = doc[:, k : k + seqlen] == doc[:, width - 1 :]  # (batch, seqlen)
            tap = tap * same_doc[..., None]
        out = out + weight[:, k].to(acc) * tap
    out = activate(out, activation).to(x.dtype)

    if not return_final_state:
        return out, None
    final = xs[:, seqlen:]  # the last width-1 inputs, (batch, width - 1, dim)
    if doc is not None:
        # only the last document's inputs are its state; older documents read as zeros
        final = final * (doc[:, seqlen:] == doc[:, -1:])[..., None]
    return out, final.transpose(1, 2).to(x.dtype)


def causal_conv1d_update_impl(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None,
) -> torch.Tensor:
    """One step: x (batch, dim); conv_state (batch, dim, width - 1), shifted left in place with x
    appended. Returns (batch, dim) in x's dtype."""
    acc = compute_dtype(x, weight)
    window = torch.cat([conv_state.to(acc), x.to(acc)[:, :, None]], dim=2)  # (batch, dim, width)
    out = (window * weight.to(acc)).sum(-1)
    if bias is not None:
        out = out + bias.to(acc)
    conv_state.copy_(window[:, :, 1:])
    return activate(out, activation).to(x.dtype)
