"""Phonebook lookup (Waleffe et al. 2024, "An Empirical Study of Mamba-based Language Models", the
phonebook task): read a list of names with their phone numbers, then give the number of a queried name.

Tokens: digits 0 .. 9, then SEP (10, between a name and its number), EOL (11, end of an entry), QUERY (12),
ANSWER (13), then the name tokens 14 .. vocab_size - 1. One row:
    name_1 SEP d d .. d EOL  ...  name_N SEP d .. d EOL  QUERY name_q ANSWER d_1 .. d_m
Names are `name_len` name tokens and distinct within a row; numbers are `number_len` random digits. The
number is scored digit by digit with teacher forcing: the answer at ANSWER is d_1, at d_1 it is d_2, ...
The paper states the task in natural language over a pretrained tokenizer; this is its token-level form.
Defaults (ours): 256 entries of 2-token names and 7-digit numbers (~2.8k tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mambakit.tasks.base import IGNORE, TaskBatch, check_int, random_distinct

SEP, EOL, QUERY, ANSWER = 10, 11, 12, 13
FIRST_NAME_TOKEN = 14


@dataclass(frozen=True)
class Phonebook:
    num_entries: int = 256
    name_len: int = 2
    number_len: int = 7
    vocab_size: int = 64

    def __post_init__(self) -> None:
        check_int("num_entries", self.num_entries)
        check_int("name_len", self.name_len)
        check_int("number_len", self.number_len)
        check_int("vocab_size", self.vocab_size, FIRST_NAME_TOKEN + 1)
        if self.num_names < self.num_entries:
            raise ValueError(
                f"vocab_size={self.vocab_size} and name_len={self.name_len} give {self.num_names} names, "
                f"fewer than num_entries={self.num_entries}"
            )

    @classmethod
    def paper(cls) -> Phonebook:
        return cls()

    @classmethod
    def cpu(cls) -> Phonebook:
        return cls(num_entries=16, name_len=2, number_len=3, vocab_size=32)

    @property
    def num_names(self) -> int:
        return (self.vocab_size - FIRST_NAME_TOKEN) ** self.name_len

    @property
    def entry_len(self) -> int:
        return self.name_len + self.number_len + 2

    @property
    def seqlen(self) -> int:
        return self.num_entries * self.entry_len + self.name_len + 2 + self.number_len

    def _spell(self, ids: torch.Tensor) -> torch.Tensor:
        """Name ids (...,) -> name tokens (..., name_len), most significant first."""
        base = self.vocab_size - FIRST_NAME_TOKEN
        powers = base ** torch.arange(self.name_len - 1, -1, -1)
        return (ids.unsqueeze(-1) // powers) % base + FIRST_NAME_TOKEN

    def sample(self, batch_size: int, generator: torch.Generator) -> TaskBatch:
        """A batch: input_ids, targets (batch_size, seqlen); number_len answers per row."""
        check_int("batch_size", batch_size)
        b, n = batch_size, self.num_entries
        name_ids = random_distinct(b, n, 0, self.num_names, generator)
        numbers = torch.randint(0, 10, (b, n, self.number_len), generator=generator)
        entries = torch.cat(
            [
                self._spell(name_ids),
                torch.full((b, n, 1), SEP),
                numbers,
                torch.full((b, n, 1), EOL),
            ],
            dim=2,
        ).reshape(b, n * self.entry_len)
        q = torch.randint(0, n, (b,), generator=generator)
        rows = torch.arange(b)
        answer = numbers[rows, q]  # (b, number_len)
        query = torch.cat(
            [torch.full((b, 1), QUERY), self._spell(name_ids[rows, q]), torch.full((b, 1), ANSWER), answer],
            dim=1,
        )
        input_ids = torch.cat([entries, query], dim=1)
        targets = torch.full_like(input_ids, IGNORE)
        targets[:, -self.number_len - 1 : -1] = answer
        return TaskBatch(input_ids, targets)

    def oracle(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(batch, seqlen) predictions from input_ids alone: parse the book, look up the queried name."""
        predictions = torch.zeros_like(input_ids)
        m, width = self.number_len, self.entry_len
        for row in range(input_ids.shape[0]):
            ids = input_ids[row].tolist()
            book = {}
            for e in range(self.num_entries):
                entry = ids[e * width : (e + 1) * width]
                book[tuple(entry[: self.name_len])] = entry[self.name_len + 1 : self.name_len + 1 + m]
            name = tuple(ids[-m - 1 - self.name_len : -m - 1])
            predictions[row, -m - 1 : -1] = torch.tensor(book[name])
        return predictions
