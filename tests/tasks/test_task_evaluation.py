"""Evaluators: a perfect predictor scores 1, a constant one about chance; bad inputs are named."""

from __future__ import annotations

import pytest
import torch

from mambakit.tasks.base import IGNORE, answer_accuracy, make_generator, sequence_accuracy
from mambakit.tasks.induction_heads import InductionHeads
from mambakit.tasks.mqar import MQAR
from mambakit.tasks.phonebook import Phonebook
from mambakit.tasks.selective_copying import SelectiveCopying

# (task, a constant prediction, the chance of that constant being right)
CASES = [
    (SelectiveCopying(seqlen=64, num_tokens=8, vocab_size=16), 1, 1 / 14),
    (InductionHeads(seqlen=32, vocab_size=16), 0, 1 / 15),
    (MQAR(seqlen=64, num_kv_pairs=8, vocab_size=64), 40, 1 / 32),
    (Phonebook(num_entries=8, name_len=2, number_len=4, vocab_size=24), 3, 1 / 10),
]


@pytest.mark.parametrize("task, constant, chance", CASES, ids=lambda c: type(c).__name__)
def test_perfect_and_constant_predictors(task, constant, chance):
    batch = task.sample(512, make_generator(0))
    perfect = torch.where(batch.answer_mask, batch.targets, 0)
    assert answer_accuracy(perfect, batch.targets) == 1.0
    assert sequence_accuracy(perfect, batch.targets) == 1.0
    # logits that put the mass on the right token are read through argmax
    logits = torch.nn.functional.one_hot(perfect, task.vocab_size).float()
    assert answer_accuracy(logits, batch.targets) == 1.0
    const = torch.full_like(batch.targets, constant)
    acc = answer_accuracy(const, batch.targets)
    assert abs(acc - chance) < 0.05, (acc, chance)


def test_accuracy_counts_only_answer_positions():
    targets = torch.tensor([[IGNORE, 3, IGNORE, 5], [IGNORE, IGNORE, 7, IGNORE]])
    predictions = torch.tensor([[9, 3, 9, 4], [0, 0, 7, 0]])
    assert answer_accuracy(predictions, targets) == pytest.approx(2 / 3)
    assert sequence_accuracy(predictions, targets) == pytest.approx(1 / 2)


def test_bad_evaluator_inputs_are_named():
    targets = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="predictions"):
        answer_accuracy(torch.zeros(2, 5, dtype=torch.long), targets)
    with pytest.raises(ValueError, match="targets"):
        answer_accuracy(torch.zeros(2, 4, dtype=torch.long), torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="answer positions"):
        answer_accuracy(targets, torch.full_like(targets, IGNORE))
