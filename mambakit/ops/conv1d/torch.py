"""PyTorch backend of causal depthwise conv1d: one grouped `F.conv1d` over the state-prefixed input.

With seq_idx, the taps that would cross a document boundary are masked on a strided (unfold) view of
the input windows, so the whole sequence is still one vectorized op. Autograd by PyTorch (gradients
reach x, weight, bias and initial_state). The one-token step is the reference's: it is already a
single vectorized multiply-add over the window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mambakit.ops.conv1d.reference import (
    activate,
    causal_conv1d_update_impl,
    compute_dtype,
    extended_doc_ids,
)


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
    # half inputs are upcast: float32 accumulation is what the reference and the GPU kernels do
    xt = x.transpose(1, 2).to(acc)  # (batch, dim, seqlen)
    if initial_state is None:
        xt = F.pad(xt, (width - 1, 0))
    else:
        xt = torch.cat([initial_state.to(acc), xt], dim=2)  # (batch, dim, width - 1 + seqlen)
    w = weight.to(acc)
    b = None if bias is None else bias.to(acc)

    if seq_idx is None:
        out = F.conv1d(xt, w[:, None, :], b, groups=dim)  # (batch, dim, seqlen)
    else:
        doc = extended_doc_ids(seq_idx, width)  # (batch, width - 1 + seqlen)
        same_doc = doc.unfold(1, width, 1) == doc[:, width - 1 :, None]  # (batch, seqlen, width)
        windows = xt.unfold(2, width, 1) * same_doc[:, None].to(acc)  # (batch, dim, seqlen, width)
        out = torch.einsum("bdlk,dk->bdl", windows, w)
        if b is not None:
            out = out + b[:, None]
    out = activate(out, activation).transpose(1, 2).to(x.dtype).contiguous()

    if not return_final_state:
        return out, None
    final = xt[:, :, seqlen:]  # the last width-1 inputs, (batch, dim, width - 1)
    if seq_idx is not None:
        final = final * (doc[:, seqlen:] == doc[:, -1:])[:, None].to(acc)
    return out, final.to(x.dtype)


__all__ = ["causal_conv1d_impl", "causal_conv1d_update_impl"]
