"""Phonebook lookup (Waleffe et al. 2024, "An Empirical Study of Mamba-based Language Models", the
phonebook task): read a list of names with their phone numbers, then give the number of a queried name.

Tokens: digits 0 .. 9, then SEP (10, between a name and its number), EOL (11, end of an entry), QUERY (12),
ANSWER (13), then the name tokens 14 .. vocab_size - 1. One row:
    name_1 SEP d d .. d EOL  ...  name_N SEP d .. d EOL  QUERY name_q ANSWER d_1 .. d_m  [QUERY ...]
Names are `name_len` name tokens and distinct within a row; numbers are `number_len` random digits. The
number is scored digit by digit with teacher forcing: the answer at ANSWER is d_1, at d_1 it is d_2, ...
`num_queries` queries (of distinct entries) follow the book; the paper asks one, and more give a model
trained from scratch more answers to learn from per row (the CPU setting asks 4).
The paper states the task in natural language over a pretrained tokenizer; this is its token-level form.
Defaults (ours): 256 entries of 2-token names and 7-digit numbers (~2.8k tokens), one query.
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
    num_queries: int = 1

    def __post_init__(self) -> None:
        check_int("num_entries", self.num_entries)
        check_int("name_len", self.name_len)
        check_int("number_len", self.number_len)
        check_int("vocab_size", self.vocab_size, FIRST_NAME_TOKEN + 1)
        check_int("num_queries", self.num_queries)
        if self.num_queries > self.num_entries:
            raise ValueError(
                f"num_queries={self.num_queries} must be at most num_entries={self.num_entries} "
                "(each query asks a different entry)"
            )
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
        return cls(num_entries=16, name_len=2, number_len=3, vocab_size=32, num_queries=4)

    @property
    def num_names(self) -> int:
        return (self.vocab_size - FIRST_NAME_TOKEN) ** self.name_len

    @property
    def entry_len(self) -> int:
        return self.name_len + self.number_len + 2

    @property
    def query_len(self) -> int:
        return self.name_len + 2 + self.number_len

    @property
    def seqlen(self) -> int:
        return self.num_entries * self.entry_len + self.num_queries * self.query_len

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
        q = random_distinct(b, self.num_queries, 0, n, generator)  # (b, num_queries) entries asked
        rows = torch.arange(b)[:, None]
        answers = numbers[rows, q]  # (b, num_queries, number_len)
        queries = torch.cat(
            [
                torch.full((b, self.num_queries, 1), QUERY),
                self._spell(name_ids[rows, q]),
                torch.full((b, self.num_queries, 1), ANSWER),
                answers,
            ],
            dim=2,
        )
        input_ids = torch.cat([entries, queries.reshape(b, -1)], dim=1)
        targets = torch.full_like(input_ids, IGNORE)
        # the answer to digit j of a query sits one position before it (at ANSWER or at digit j - 1)
        answer_pos = self.num_entries * self.entry_len + self.name_len + 1 + torch.arange(self.number_len)
        answer_pos = answer_pos + self.query_len * torch.arange(self.num_queries)[:, None]
        targets[:, answer_pos.flatten()] = answers.reshape(b, -1)
        return TaskBatch(input_ids, targets)

    def oracle(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(batch, seqlen) predictions from input_ids alone: parse the book, look up each queried name."""
        predictions = torch.zeros_like(input_ids)
        m, width, book_len = self.number_len, self.entry_len, self.num_entries * self.entry_len
        for row in range(input_ids.shape[0]):
            ids = input_ids[row].tolist()
            book = {}
            for e in range(self.num_entries):
                entry = ids[e * width : (e + 1) * width]
                book[tuple(entry[: self.name_len])] = entry[self.name_len + 1 : self.name_len + 1 + m]
            for k in range(self.num_queries):
                start = book_len + k * self.query_len  # QUERY name ANSWER digits
                name = tuple(ids[start + 1 : start + 1 + self.name_len])
                first = start + 1 + self.name_len  # the ANSWER position
                predictions[row, first : first + m] = torch.tensor(book[name])
        return predictions
