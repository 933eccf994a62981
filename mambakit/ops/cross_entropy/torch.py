"""Chunked linear cross-entropy: the LM head and the loss fused over chunks of tokens.

Forward, for each chunk of `chunk_size` tokens: logits = hidden_chunk @ weight[:vocab].T in the matmul
dtype (the autocast dtype under autocast), upcast to float32 (float64 for float64 inputs), and only
the per-token logsumexp and target logit are kept. Backward, for each chunk again: the logits are
recomputed, turned in place into d loss / d logits = (softmax - onehot(target)) * row scale, cast to
the matmul dtype, and multiplied into d hidden = dlogits @ weight and d weight += dlogits.T @ hidden.
So at most one chunk's logits exist at a time (float32 plus one matmul-dtype copy), never the
(tokens, vocab) matrix; the price is one extra matmul (the recomputation) in the backward.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


def _dtypes(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(matmul dtype, accumulation dtype): autocast's dtype when autocast is on for this device (as
    F.linear would use), else the inputs' dtype; softmax and sums in float32 at least."""
    device_type = hidden.device.type
    castable = (torch.float16, torch.bfloat16, torch.float32)
    if torch.is_autocast_enabled(device_type) and hidden.dtype in castable and weight.dtype in castable:
        mm = torch.get_autocast_dtype(device_type)
    else:
        mm = torch.promote_types(hidden.dtype, weight.dtype)
    return mm, torch.promote_types(mm, torch.float32)


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """h (c, d_model), w (vocab, d_model), both in the matmul dtype -> logits (c, vocab) in `acc`, a
    fresh tensor that may be modified in place."""
    logits = h @ w.T
    return logits.to(acc) if logits.dtype != acc else logits


class LinearCrossEntropy(torch.autograd.Function):
    """loss of hidden (N, d_model) against targets (N,) through the head weight (padded_vocab, d_model)."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        ignore_index: int,
        vocab_size: int,
        reduction: str,
        chunk_size: int,
    ) -> torch.Tensor:
        mm, acc = _dtypes(hidden, weight)
        n = hidden.shape[0]
        valid = targets != ignore_index  # (N,)
        safe = torch.where(valid, targets, 0).long()  # (N,) a class index on every row
        lse = torch.empty(n, dtype=acc, device=hidden.device)  # (N,) logsumexp of each row's logits
        target_logit = torch.empty(n, dtype=acc, device=hidden.device)  # (N,)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight[:vocab_size].to(mm)  # (vocab, d_model)
            for s in range(0, n, chunk_size):
                e = min(s + chunk_size, n)
                logits = _chunk_logits(hidden[s:e].to(mm), w, acc)  # (c, vocab)
                target_logit[s:e] = logits.gather(1, safe[s:e, None])[:, 0]
                m = logits.amax(1, keepdim=True)  # (c, 1) the row max, for a stable exp
                lse[s:e] = logits.sub_(m).exp_().sum(1).log_() + m[:, 0]
            del w
        loss = torch.where(valid, lse - target_logit, 0.0)  # (N,)
        count = valid.sum()
        ctx.save_for_backward(hidden, weight, safe, valid, lse, count)
        ctx.vocab_size, ctx.reduction, ctx.chunk_size = vocab_size, reduction, chunk_size
        ctx.dtypes = mm, acc  # the backward runs outside autocast: recompute in the forward's dtype
        if reduction == "none":
            return loss
        total = loss.sum()
        return total if reduction == "sum" else total / count

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        hidden, weight, safe, valid, lse, count = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        mm, acc = ctx.dtypes
        vocab, chunk = ctx.vocab_size, ctx.chunk_size
        n = hidden.shape[0]
        # d loss / d (logsumexp_i - target_logit_i): grad_out (times 1/count for the mean), 0 where ignored
        scale = grad_out.to(acc) / count if ctx.reduction == "mean" else grad_out.to(acc)
        row_scale = torch.where(valid, scale, 0.0)  # (N,)
        minus_one = torch.where(valid, -1.0, 0.0).to(acc)[:, None]  # (N, 1) the onehot, where counted
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight[:vocab].to(mm)  # (vocab, d_model)
            for s in range(0, n, chunk):
                e = min(s + chunk, n)
                h = hidden[s:e].to(mm)  # (c, d_model)
                dlogits = _chunk_logits(h, w, acc).sub_(lse[s:e, None]).exp_()  # (c, vocab) softmax
                dlogits.scatter_add_(1, safe[s:e, None], minus_one[s:e])
                dlogits = dlogits.mul_(row_scale[s:e, None]).to(mm)
                if need_h:
                    grad_h[s:e] = dlogits @ w
                if need_w:
                    if mm == acc:
                        grad_w[:vocab].addmm_(dlogits.T, h)
                    else:
                        grad_w[:vocab] += dlogits.T @ h
        if need_w and grad_w.dtype != weight.dtype:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None, None


def linear_cross_entropy_impl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    vocab_size: int,
    reduction: str,
    chunk_size: int,
) -> torch.Tensor:
    """hidden (N, d_model), weight (padded_vocab, d_model), targets (N,) -> loss (() or (N,))."""
    return LinearCrossEntropy.apply(hidden, weight, targets, ignore_index, vocab_size, reduction, chunk_size)
