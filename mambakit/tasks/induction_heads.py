"""Induction heads (Olsson et al. 2022; Gu & Dao 2023, Mamba paper, Section 3.1 and Table 2): after a
special token, recall the token that followed the special token's earlier occurrence.

Layout of one row (length `seqlen`): random tokens from 0 .. vocab_size - 2; at one random position p
(p + 1 < seqlen - 1) the special token (vocab_size - 1) followed by the recall token v; the last position
holds the special token again and its answer is v. The special token appears nowhere else, so the answer
is recoverable. Paper setting: vocabulary 16, trained at seqlen 256, evaluated at 2^6 .. 2^20.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mambakit.tasks.base import IGNORE, TaskBatch, check_int


@dataclass(frozen=True)
class InductionHeads:
    seqlen: int = 256
    vocab_size: int = 16
    eval_lengths: tuple[int, ...] = tuple(2**k for k in range(6, 21))

    def __post_init__(self) -> None:
        check_int("seqlen", self.seqlen, 4)
        check_int("vocab_size", self.vocab_size, 3)
        for n in self.eval_lengths:
            check_int("eval_lengths entry", n, 4)

    @classmethod
    def paper(cls) -> InductionHeads:
        return cls()

    @classmethod
    def cpu(cls) -> InductionHeads:
        """Train at 64 tokens, evaluate up to 2^13 (minutes on a laptop CPU)."""
        return cls(seqlen=64, vocab_size=16, eval_lengths=tuple(2**k for k in range(6, 14)))

    @property
    def special(self) -> int:
        return self.vocab_size - 1

    def sample(self, batch_size: int, generator: torch.Generator, seqlen: int | None = None) -> TaskBatch:
        """A batch of rows of `seqlen` tokens (default: the training length); one answer per row."""
        check_int("batch_size", batch_size)
        n = check_int("seqlen", self.seqlen if seqlen is None else seqlen, 4)
        input_ids = torch.randint(0, self.vocab_size - 1, (batch_size, n), generator=generator)
        p = torch.randint(0, n - 2, (batch_size,), generator=generator)  # p + 1 <= n - 2
        rows = torch.arange(batch_size)
        input_ids[rows, p] = self.special
        input_ids[:, -1] = self.special
        targets = torch.full_like(input_ids, IGNORE)
        targets[:, -1] = input_ids[rows, p + 1]
        return TaskBatch(input_ids, targets)

    def oracle(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(batch, seqlen) predictions read from input_ids alone: the token after the first special."""
        first = (input_ids == self.special).int().argmax(dim=1)
        predictions = torch.zeros_like(input_ids)
        predictions[:, -1] = input_ids[torch.arange(input_ids.shape[0]), first + 1]
        return predictions
