"""Multi-query associative recall, MQAR (Arora et al. 2023, "Zoology", Section 3): read key-value pairs,
then answer every key queried later with its value.

Layout of one row (length `seqlen`): `num_kv_pairs` pairs k1 v1 k2 v2 ... (keys distinct, drawn from
1 .. vocab_size/2 - 1, values from vocab_size/2 .. vocab_size - 1); the rest of the row is split into slots
of two positions. Each key is queried once, at the start of a slot chosen with probability falling as a
power law of its distance from the pairs (exponent `power_a - 1`, Zoology's `power_a` = 0.01), so most
queries come soon after the pairs and a few come late. Every other position holds a random token (Zoology's
`random_non_queries`). The answer sits on the query key's own position: the value of that key.
Defaults: vocab 8192, seqlen 256, 16 pairs (one point of Zoology's grid, seqlen 64 .. 512, 4 .. 64 pairs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mambakit.tasks.base import IGNORE, TaskBatch, check_int, random_distinct


@dataclass(frozen=True)
class MQAR:
    seqlen: int = 256
    num_kv_pairs: int = 16
    vocab_size: int = 8192
    power_a: float = 0.01

    def __post_init__(self) -> None:
        check_int("seqlen", self.seqlen, 4)
        check_int("num_kv_pairs", self.num_kv_pairs, 1)
        check_int("vocab_size", self.vocab_size, 4)
        if self.seqlen < 4 * self.num_kv_pairs:
            raise ValueError(
                f"seqlen={self.seqlen} must be at least 4 * num_kv_pairs={4 * self.num_kv_pairs} "
                "(the pairs, then one two-position slot per query)"
            )
        if self.vocab_size // 2 - 1 < self.num_kv_pairs:
            raise ValueError(
                f"vocab_size={self.vocab_size} leaves {self.vocab_size // 2 - 1} keys for "
                f"num_kv_pairs={self.num_kv_pairs} distinct keys"
            )
        if not 0.0 < self.power_a <= 1.0:
            raise ValueError(f"power_a must be in (0, 1], got {self.power_a!r}")

    @classmethod
    def paper(cls) -> MQAR:
        return cls()

    @classmethod
    def cpu(cls) -> MQAR:
        return cls(seqlen=64, num_kv_pairs=8, vocab_size=128)

    def sample(self, batch_size: int, generator: torch.Generator) -> TaskBatch:
        """A batch: input_ids, targets (batch_size, seqlen); num_kv_pairs answers per row."""
        check_int("batch_size", batch_size)
        n, half = self.num_kv_pairs, self.vocab_size // 2
        keys = random_distinct(batch_size, n, 1, half, generator)
        values = torch.randint(half, self.vocab_size, (batch_size, n), generator=generator)
        input_ids = torch.randint(0, self.vocab_size, (batch_size, self.seqlen), generator=generator)
        input_ids[:, 0 : 2 * n : 2] = keys
        input_ids[:, 1 : 2 * n : 2] = values
        # query slots: slot s starts at 2n + 2s; weight (s + 1)^(power_a - 1)
        num_slots = (self.seqlen - 2 * n) // 2
        weights = torch.arange(1, num_slots + 1, dtype=torch.float64) ** (self.power_a - 1.0)
        slots = torch.multinomial(weights.expand(batch_size, -1), n, replacement=False, generator=generator)
        query_pos = 2 * n + 2 * slots  # (batch, n)
        order = torch.rand(batch_size, n, generator=generator).argsort(dim=1)  # which key each slot asks
        input_ids.scatter_(1, query_pos, keys.gather(1, order))
        targets = torch.full_like(input_ids, IGNORE)
        targets.scatter_(1, query_pos, values.gather(1, order))
        return TaskBatch(input_ids, targets)

    def oracle(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(batch, seqlen) predictions from input_ids alone: after the pairs, each key token's value."""
        n = self.num_kv_pairs
        predictions = torch.zeros_like(input_ids)
        for row in range(input_ids.shape[0]):
            table = dict(zip(input_ids[row, 0 : 2 * n : 2].tolist(), input_ids[row, 1 : 2 * n : 2].tolist()))
            for t in range(2 * n, self.seqlen):
                predictions[row, t] = table.get(int(input_ids[row, t]), 0)
        return predictions
