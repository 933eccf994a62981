"""The next-token loss of a LanguageModel, shared by the trainer, its evaluation and benchmarks/gpu_model.py.

By default the model returns its final-normed hidden states and `ops.linear_cross_entropy` applies the
LM head and the cross-entropy over chunks of tokens, so the (tokens, vocab) logits never exist whole
(in float32 they are 8 x 2048 x 50,277 x 4 B = 3.3 GB for the 130M presets at batch 8 x 2048).
`full_logits=True` is the textbook path (logits, upcast to float32, F.cross_entropy), kept for comparison.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mambakit import ops
from mambakit.models.lm import LanguageModel
from mambakit.training.data import IGNORE_INDEX


def unwrap(model: nn.Module) -> LanguageModel:
    """The LanguageModel inside a DistributedDataParallel wrapper (FSDP2 keeps the model itself)."""
    return getattr(model, "module", model)


def lm_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    targets: torch.Tensor,
    seq_idx: torch.Tensor | None = None,
    *,
    reduction: str = "sum",
    full_logits: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of `model` (a LanguageModel, or one wrapped by DDP/FSDP2) on one batch.

    input_ids, targets, seq_idx: (batch, seqlen); targets are IGNORE_INDEX where nothing is predicted.
    Returns the float32 loss, summed over the non-ignored targets (`reduction="sum"`, what the trainer
    divides by the global target count) or their mean (`"mean"`). Call it inside the autocast context
    the model runs under: the head's matmuls then run in the autocast dtype, the softmax in float32.
    """
    if full_logits:
        logits = model(input_ids, seq_idx=seq_idx)  # (batch, seqlen, vocab_size)
        return F.cross_entropy(
            logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction=reduction
        )
    hidden = model(input_ids, seq_idx=seq_idx, return_hidden_states=True)  # (batch, seqlen, d_model)
    lm = unwrap(model)
    return ops.linear_cross_entropy(
        hidden,
        lm.lm_head.weight,
        targets,
        ignore_index=IGNORE_INDEX,
        vocab_size=lm.config.vocab_size,
        reduction=reduction,
        chunk_size=chunk_size,
    )
