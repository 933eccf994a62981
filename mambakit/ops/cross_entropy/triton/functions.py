"""Launchers of the cross-entropy kernels as the chunk loop's `RowOps`, and the backend's entry."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mambakit.ops.cross_entropy.torch import LinearCrossEntropy, RowOps
from mambakit.ops.cross_entropy.triton.kernels import row_stats_kernel, softmax_grad_kernel


def _block_v() -> int:
    # the interpreter runs each program in Python: small blocks would only multiply its CPU time
    return 256 if os.environ.get("TRITON_INTERPRET") == "1" else 2048


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _rows_contiguous(logits: torch.Tensor) -> torch.Tensor:
    return logits if logits.stride(1) == 1 else logits.contiguous()


def row_stats(logits: torch.Tensor, safe: torch.Tensor, vocab_size: int, acc: torch.dtype):
    """logits (c, cols), safe (c,) int64 -> (logsumexp (c,), target logit (c,)) in `acc`."""
    logits = _rows_contiguous(logits)
    c = logits.shape[0]
    lse = torch.empty(c, dtype=acc, device=logits.device)
    target = torch.empty(c, dtype=acc, device=logits.device)
    if c:
        row_stats_kernel[(c,)](
            logits, safe, lse, target, vocab_size, logits.stride(0), ACC=_acc(acc), BLOCK_V=_block_v(),
            num_warps=8,
        )  # fmt: skip
    return lse, target


def softmax_grad(
    logits: torch.Tensor, lse: torch.Tensor, safe: torch.Tensor, row_scale: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    """(softmax(logits) - onehot(safe)) * row_scale[:, None], (c, cols) in logits' dtype, in place."""
    logits = _rows_contiguous(logits)
    c, cols = logits.shape
    if c:
        block = _block_v()
        softmax_grad_kernel[(c, triton.cdiv(cols, block))](
            logits, logits, lse, safe, row_scale, vocab_size, cols, logits.stride(0), logits.stride(0),
            ACC=_acc(lse.dtype), BLOCK_V=block, num_warps=8,
        )  # fmt: skip
    return logits


ROW_OPS = RowOps(row_stats, softmax_grad)


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
        hidden, weight, targets, ignore_index, vocab_size, reduction, chunk_size, ROW_OPS
    )
