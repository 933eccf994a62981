"""Selective copying (Gu & Dao 2023, Mamba paper, Section 3.1 and Table 1): remember the data tokens
scattered among noise tokens and repeat them, in order, after the sequence ends.

Layout of one row (length `seqlen`): the first `seqlen - num_tokens` positions hold noise (token 0) except
`num_tokens` random positions that hold data tokens (1 .. vocab_size - 2); then `num_tokens` marker tokens
(vocab_size - 1). At the i-th marker the answer is the i-th data token. The spacing is random, so a
time-invariant (LTI) model cannot solve it with a fixed kernel: it must select by content.
Paper setting: seqlen 4096, 16 tokens to memorize, vocabulary 16 (14 data tokens, noise, marker).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mambakit.tasks.base import IGNORE, TaskBatch, check_int, random_distinct

NOISE = 0


@dataclass(frozen=True)
class SelectiveCopying:
    seqlen: int = 4096
    num_tokens: int = 16
    vocab_size: int = 16

    def __post_init__(self) -> None:
        check_int("seqlen", self.seqlen, 2)
        check_int("num_tokens", self.num_tokens, 1)
        check_int("vocab_size", self.vocab_size, 3)
        if self.seqlen < 2 * self.num_tokens:
            raise ValueError(
                f"seqlen={self.seqlen} must be at least 2 * num_tokens={2 * self.num_tokens} "
                "(data tokens and their markers)"
            )

    @classmethod
    def paper(cls) -> SelectiveCopying:
        return cls()

    @classmethod
    def cpu(cls) -> SelectiveCopying:
        """Small enough to train in a few minutes on a laptop CPU."""
        return cls(seqlen=32, num_tokens=4, vocab_size=16)

    @property
    def marker(self) -> int:
        return self.vocab_size - 1

    def sample(self, batch_size: int, generator: torch.Generator) -> TaskBatch:
        """A batch of `batch_size` rows: input_ids, targets (batch_size, seqlen)."""
        check_int("batch_size", batch_size)
        k, region = self.num_tokens, self.seqlen - self.num_tokens
        positions = random_distinct(batch_size, k, 0, region, generator).sort(dim=1).values
        data = torch.randint(1, self.vocab_size - 1, (batch_size, k), generator=generator)
        input_ids = torch.full((batch_size, self.seqlen), NOISE, dtype=torch.long)
        input_ids.scatter_(1, positions, data)
        input_ids[:, region:] = self.marker
        targets = torch.full_like(input_ids, IGNORE)
        targets[:, region:] = data
        return TaskBatch(input_ids, targets)

    def oracle(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(batch, seqlen) predictions that read the answers from input_ids alone (for tests)."""
        region = self.seqlen - self.num_tokens
        predictions = torch.zeros_like(input_ids)
        for row in range(input_ids.shape[0]):
            prefix = input_ids[row, :region]
            predictions[row, region:] = prefix[prefix != NOISE]
        return predictions
