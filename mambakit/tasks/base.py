"""What every synthetic task shares: the batch it yields, argument checks and the accuracy evaluator.

A task batch is batch-first: `input_ids (batch, seqlen)` int64 and `targets (batch, seqlen)` int64 with
IGNORE (-100) on every position that is not an answer. The model reads `input_ids` and is scored only at
the answer positions: position t is answered by the logits at t (what the model predicts after reading
input_ids[:, : t + 1]), so targets are already aligned with the logits and need no shift.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100


@dataclass
class TaskBatch:
    """input_ids (batch, seqlen) int64; targets (batch, seqlen) int64, IGNORE off the answer positions."""

    input_ids: torch.Tensor
    targets: torch.Tensor

    @property
    def answer_mask(self) -> torch.Tensor:
        """(batch, seqlen) bool: the positions that are scored."""
        return self.targets != IGNORE


def check_int(name: str, value: object, minimum: int = 1) -> int:
    """`value` as an int >= `minimum`, or a ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def make_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with `seed`: the same seed gives the same batches on any device."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    return torch.Generator().manual_seed(seed)


def random_distinct(batch: int, count: int, low: int, high: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, count) int64: in each row `count` distinct values from [low, high), in random order."""
    if high - low < count:
        raise ValueError(f"cannot draw {count} distinct values from [{low}, {high})")
    scores = torch.rand(batch, high - low, generator=generator)
    return scores.argsort(dim=1)[:, :count] + low


def answer_accuracy(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of answer positions (targets != IGNORE) where predictions == targets.

    predictions: (batch, seqlen) int token ids, or logits (batch, seqlen, vocab) (argmax is taken);
    targets: (batch, seqlen) with IGNORE off the answer positions.
    """
    if not isinstance(targets, torch.Tensor) or targets.ndim != 2:
        raise ValueError(
            f"targets must be a (batch, seqlen) tensor, got {getattr(targets, 'shape', targets)}"
        )
    if not isinstance(predictions, torch.Tensor):
        raise ValueError(f"predictions must be a tensor, got {type(predictions).__name__}")
    if predictions.is_floating_point():
        predictions = predictions.argmax(dim=-1)
    if predictions.shape != targets.shape:
        raise ValueError(
            f"predictions must have the shape of targets {tuple(targets.shape)}, "
            f"got {tuple(predictions.shape)}"
        )
    mask = targets != IGNORE
    total = int(mask.sum())
    if total == 0:
        raise ValueError("targets has no answer positions (every entry is IGNORE)")
    return int((predictions.eq(targets) & mask).sum()) / total


def sequence_accuracy(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of rows whose every answer position is right (whole-answer exact match).

    Same arguments as `answer_accuracy`; every row must have at least one answer position.
    """
    if predictions.is_floating_point():
        predictions = predictions.argmax(dim=-1)
    if predictions.shape != targets.shape:
        raise ValueError(
            f"predictions must have the shape of targets {tuple(targets.shape)}, "
            f"got {tuple(predictions.shape)}"
        )
    mask = targets != IGNORE
    if not bool(mask.any(dim=1).all()):
        raise ValueError("every row of targets needs an answer position")
    wrong = (predictions.ne(targets) & mask).any(dim=1)
    return 1.0 - wrong.float().mean().item()
