"""Reference linear cross-entropy: the full (tokens, vocab) logits, then logsumexp minus the target logit.

This is the definition the chunked backend is tested against; it is what
`F.cross_entropy(F.linear(hidden, weight)[:, :vocab_size].float(), targets)` computes. Autograd by PyTorch.
"""

from __future__ import annotations

import torch


def linear_cross_entropy_impl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    vocab_size: int,
    reduction: str,
    chunk_size: int,
) -> torch.Tensor:
    """hidden (N, d_model), weight (padded_vocab, d_model), targets (N,) -> loss; chunk_size unused."""
    logits = hidden @ weight[:vocab_size].T  # (N, vocab), in the autocast dtype under autocast
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    valid = targets != ignore_index  # (N,)
    target_logit = logits.gather(1, torch.where(valid, targets, 0).long()[:, None])[:, 0]  # (N,)
    loss = torch.where(valid, logits.logsumexp(1) - target_logit, 0.0)  # (N,)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum()
