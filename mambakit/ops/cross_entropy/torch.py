"""Chunked linear cross-entropy: the LM head and the loss fused over chunks of tokens.

Forward, for each chunk of `chunk_size` tokens: logits = hidden_chunk @ weight[:cols].T in the matmul
dtype (the autocast dtype under autocast), and only the per-token logsumexp and target logit are kept.
Backward, for each chunk again: the logits are recomputed, turned into d loss / d logits =
(softmax - onehot(target)) * row scale in the matmul dtype, and multiplied into d hidden = dlogits @
weight and d weight += dlogits.T @ hidden. So at most one chunk's logits exist at a time (plus one
float32 copy in this backend), never the (tokens, vocab) matrix; the price is one extra matmul (the
recomputation) in the backward.

The matmuls run over `cols` = vocab_size rounded up to a multiple of 8 weight rows (zero rows appended
when the weight has fewer) and the columns from vocab_size on are masked out of the softmax: a
(tokens, 50277) matrix has rows that are not 16-byte aligned, which sends cuBLAS to kernels 2.4x slower
(65 vs 27 ms forward + backward at 8 x 2048 tokens on an H200).

The elementwise part (row logsumexp and target logit; the softmax gradient) is `RowOps`: PyTorch ops
here, fused Triton kernels in the triton backend, which reuses this chunk loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


class RowOps(NamedTuple):
    """The elementwise work on one chunk's logits (c, cols) in the matmul dtype; columns from vocab_size
    on are padding and must get probability 0.

    row_stats(logits, safe, vocab_size, acc) -> (logsumexp (c,), target logit (c,)), both in `acc`.
    softmax_grad(logits, lse, safe, row_scale, vocab_size) -> (softmax - onehot(safe)) * row_scale[:, None]
    (c, cols) in the logits' dtype, padding columns 0; it may overwrite `logits`.
    """

    row_stats: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    softmax_grad: Callable[..., torch.Tensor]


def _torch_row_stats(logits, safe, vocab_size, acc):
    x = logits.to(acc)  # (c, cols) a fresh float copy, modified in place below
    x[:, vocab_size:] = float("-inf")
    target_logit = x.gather(1, safe[:, None])[:, 0]
    m = x.amax(1, keepdim=True)  # (c, 1) the row max, for a stable exp
    lse = x.sub_(m).exp_().sum(1).log_() + m[:, 0]
    return lse, target_logit


def _torch_softmax_grad(logits, lse, safe, row_scale, vocab_size):
    x = logits.to(lse.dtype)  # (c, cols)
    x[:, vocab_size:] = float("-inf")
    x = x.sub_(lse[:, None]).exp_()  # softmax
    x.scatter_add_(1, safe[:, None], torch.full_like(lse[:, None], -1.0))
    return x.mul_(row_scale[:, None]).to(logits.dtype)


TORCH_ROW_OPS = RowOps(_torch_row_stats, _torch_softmax_grad)


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


def head_columns(vocab_size: int) -> int:
    """Columns of the chunk matmuls: vocab_size rounded up to a multiple of 8 (16-byte rows in bf16)."""
    return -(-vocab_size // 8) * 8


def _head_weight(weight: torch.Tensor, cols: int, mm: torch.dtype) -> torch.Tensor:
    """weight's first `cols` rows in the matmul dtype, zero rows appended when it has fewer."""
    w = weight[:cols].to(mm)
    return F.pad(w, (0, 0, 0, cols - w.shape[0])) if w.shape[0] < cols else w


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
        row_ops: RowOps,
    ) -> torch.Tensor:
        mm, acc = _dtypes(hidden, weight)
        n = hidden.shape[0]
        valid = targets != ignore_index  # (N,)
        safe = torch.where(valid, targets, 0).long()  # (N,) a class index on every row
        lse = torch.empty(n, dtype=acc, device=hidden.device)  # (N,) logsumexp of each row's logits
        target_logit = torch.empty(n, dtype=acc, device=hidden.device)  # (N,)
        with torch.autocast(hidden.device.type, enabled=False):
            w = _head_weight(weight, head_columns(vocab_size), mm)  # (cols, d_model)
            for s in range(0, n, chunk_size):
                e = min(s + chunk_size, n)
                logits = hidden[s:e].to(mm) @ w.T  # (c, cols)
                lse[s:e], target_logit[s:e] = row_ops.row_stats(logits, safe[s:e], vocab_size, acc)
                del logits
            del w
        loss = torch.where(valid, lse - target_logit, 0.0)  # (N,)
        count = valid.sum()
        ctx.save_for_backward(hidden, weight, safe, valid, lse, count)
        ctx.vocab_size, ctx.reduction, ctx.chunk_size, ctx.row_ops = (
            vocab_size,
            reduction,
            chunk_size,
            row_ops,
        )
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
        n, cols = hidden.shape[0], head_columns(vocab)
        # d loss / d (logsumexp_i - target_logit_i): grad_out (times 1/count for the mean), 0 where ignored
        scale = grad_out.to(acc) / count if ctx.reduction == "mean" else grad_out.to(acc)
        row_scale = torch.where(valid, scale, 0.0)  # (N,)
        grad_h = torch.empty_like(hidden) if need_h else None
        # (cols, d_model) accumulator: a view of the gradient when the weight has `cols` rows or more
        grad_w = gw = None
        if need_w:
            grad_w = torch.zeros(
                (max(cols, weight.shape[0]), weight.shape[1]), dtype=acc, device=weight.device
            )
            gw = grad_w[:cols]
        with torch.autocast(hidden.device.type, enabled=False):
            w = _head_weight(weight, cols, mm)  # (cols, d_model)
            for s in range(0, n, chunk):
                e = min(s + chunk, n)
                h = hidden[s:e].to(mm)  # (c, d_model)
                dlogits = ctx.row_ops.softmax_grad(h @ w.T, lse[s:e], safe[s:e], row_scale[s:e], vocab)
                if need_h:
                    grad_h[s:e] = dlogits @ w
                if need_w:
                    if mm == acc:
                        gw.addmm_(dlogits.T, h)
                    else:
                        gw += dlogits.T @ h
        if need_w:
            grad_w = grad_w[: weight.shape[0]]
            if grad_w.dtype != weight.dtype:
                grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None, None, None


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
    return LinearCrossEntropy.apply(
        hidden, weight, targets, ignore_index, vocab_size, reduction, chunk_size, TORCH_ROW_OPS
    )
