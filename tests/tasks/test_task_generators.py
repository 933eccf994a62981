"""Task generators: shapes, answers recoverable from the input (an oracle scores 100%), determinism by
seed, task-specific structure, and bad settings named in the error."""

from __future__ import annotations

import pytest
import torch

from mambakit.tasks.base import IGNORE, answer_accuracy, make_generator
from mambakit.tasks.induction_heads import InductionHeads
from mambakit.tasks.mqar import MQAR
from mambakit.tasks.phonebook import ANSWER, EOL, FIRST_NAME_TOKEN, QUERY, SEP, Phonebook
from mambakit.tasks.selective_copying import NOISE, SelectiveCopying

SMALL = [
    SelectiveCopying(seqlen=48, num_tokens=6, vocab_size=10),
    InductionHeads(seqlen=40, vocab_size=8),
    MQAR(seqlen=64, num_kv_pairs=8, vocab_size=64),
    Phonebook(num_entries=10, name_len=2, number_len=4, vocab_size=20),
]
IDS = ["selective_copying", "induction_heads", "mqar", "phonebook"]


@pytest.mark.parametrize("task", SMALL + [t.cpu() for t in SMALL], ids=IDS + [i + "_cpu" for i in IDS])
def test_oracle_solves_every_instance(task):
    batch = task.sample(16, make_generator(3))
    assert batch.input_ids.shape == batch.targets.shape == (16, task.seqlen)
    assert batch.input_ids.dtype == batch.targets.dtype == torch.long
    assert int(batch.input_ids.min()) >= 0 and int(batch.input_ids.max()) < task.vocab_size
    assert bool(batch.answer_mask.any(dim=1).all())
    assert answer_accuracy(task.oracle(batch.input_ids), batch.targets) == 1.0


@pytest.mark.parametrize("task", SMALL, ids=IDS)
def test_same_seed_same_batch_other_seed_other_batch(task):
    a, b = task.sample(8, make_generator(7)), task.sample(8, make_generator(7))
    c = task.sample(8, make_generator(8))
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.input_ids, c.input_ids)


@pytest.mark.parametrize("task", SMALL, ids=IDS)
def test_oracle_is_not_fooled_by_a_shuffled_input(task):
    """The oracle reads the input: answers of one batch are not recovered from another batch's input."""
    a, b = task.sample(16, make_generator(1)), task.sample(16, make_generator(2))
    assert answer_accuracy(task.oracle(b.input_ids), a.targets) < 0.5


def test_paper_defaults():
    assert (SelectiveCopying.paper().seqlen, SelectiveCopying.paper().num_tokens) == (4096, 16)
    assert SelectiveCopying.paper().vocab_size == 16
    ih = InductionHeads.paper()
    assert (ih.vocab_size, ih.seqlen, ih.eval_lengths[0], ih.eval_lengths[-1]) == (16, 256, 2**6, 2**20)
    assert MQAR.paper().vocab_size == 8192


def test_selective_copying_layout():
    task = SelectiveCopying(seqlen=30, num_tokens=5, vocab_size=8)
    batch = task.sample(32, make_generator(0))
    region = task.seqlen - task.num_tokens
    assert bool((batch.input_ids[:, region:] == task.marker).all())
    data = batch.input_ids[:, :region]
    assert bool(((data != NOISE).sum(dim=1) == task.num_tokens).all())
    assert not bool((data == task.marker).any())
    assert bool((batch.targets[:, :region] == IGNORE).all())
    # the data positions vary from row to row (the spacing is random)
    assert len({tuple((row != NOISE).nonzero().flatten().tolist()) for row in data}) > 1


def test_induction_heads_layout_and_lengths():
    task = InductionHeads(seqlen=32, vocab_size=16)
    for n in (16, 32, 1000):
        batch = task.sample(64, make_generator(0), seqlen=n)
        assert batch.input_ids.shape == (64, n)
        assert bool(((batch.input_ids == task.special).sum(dim=1) == 2).all())
        assert bool((batch.input_ids[:, -1] == task.special).all())
        assert bool((batch.answer_mask.sum(dim=1) == 1).all()) and bool(batch.answer_mask[:, -1].all())
        assert bool((batch.targets[:, -1] != task.special).all())
        assert answer_accuracy(task.oracle(batch.input_ids), batch.targets) == 1.0


def test_mqar_layout():
    task = MQAR(seqlen=64, num_kv_pairs=8, vocab_size=64)
    batch = task.sample(32, make_generator(0))
    keys, values = batch.input_ids[:, 0:16:2], batch.input_ids[:, 1:16:2]
    assert bool((keys < 32).all() and (keys >= 1).all() and (values >= 32).all())
    assert all(len(set(row.tolist())) == 8 for row in keys)  # distinct keys
    assert bool((batch.answer_mask.sum(dim=1) == 8).all())
    assert not bool(batch.answer_mask[:, :16].any())
    # every key is queried once: the queried keys of a row are its keys
    for row in range(32):
        queried = batch.input_ids[row][batch.answer_mask[row]]
        assert sorted(queried.tolist()) == sorted(keys[row].tolist())
    # queries lean early (power law) but not all in the first slots
    first = batch.answer_mask[:, 16:40].sum().item()
    assert first > batch.answer_mask[:, 40:].sum().item()


def test_phonebook_layout():
    task = Phonebook(num_entries=6, name_len=2, number_len=3, vocab_size=18)
    batch = task.sample(16, make_generator(0))
    ids = batch.input_ids
    width = task.entry_len
    entries = ids[:, : task.num_entries * width].reshape(16, task.num_entries, width)
    assert bool((entries[:, :, 2] == SEP).all() and (entries[:, :, -1] == EOL).all())
    assert bool((entries[:, :, :2] >= FIRST_NAME_TOKEN).all() and (entries[:, :, 3:6] < 10).all())
    names = [{tuple(e[:2].tolist()) for e in row} for row in entries]
    assert all(len(n) == task.num_entries for n in names)  # distinct names in a row
    assert bool((ids[:, -3 - 4] == QUERY).all() and (ids[:, -3 - 1] == ANSWER).all())
    assert bool((batch.answer_mask.sum(dim=1) == 3).all())


def test_phonebook_queries_ask_distinct_entries_and_answer_each_digit():
    task = Phonebook(num_entries=6, name_len=2, number_len=3, vocab_size=18, num_queries=4)
    batch = task.sample(32, make_generator(1))
    ids, targets = batch.input_ids, batch.targets
    book_len = task.num_entries * task.entry_len
    queries = ids[:, book_len:].reshape(32, 4, task.query_len)  # QUERY n n ANSWER d d d
    assert bool((queries[:, :, 0] == QUERY).all() and (queries[:, :, 3] == ANSWER).all())
    assert all(len({tuple(q[1:3].tolist()) for q in row}) == 4 for row in queries)  # distinct names
    answered = targets[:, book_len:].reshape(32, 4, task.query_len)
    # teacher forcing: the target at ANSWER and at digits 1..m-1 is the next digit
    assert torch.equal(answered[:, :, 3:6], queries[:, :, 4:7])
    assert bool((answered[:, :, :3] == -100).all() and (answered[:, :, 6] == -100).all())
    assert bool((targets[:, :book_len] == -100).all())


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: SelectiveCopying(seqlen=10, num_tokens=6), "seqlen"),
        (lambda: SelectiveCopying(num_tokens=0), "num_tokens"),
        (lambda: SelectiveCopying(vocab_size=2), "vocab_size"),
        (lambda: InductionHeads(seqlen=3), "seqlen"),
        (lambda: InductionHeads(eval_lengths=(64, 2)), "eval_lengths"),
        (lambda: MQAR(seqlen=30, num_kv_pairs=8), "seqlen"),
        (lambda: MQAR(vocab_size=16, num_kv_pairs=8, seqlen=64), "vocab_size"),
        (lambda: MQAR(power_a=0.0), "power_a"),
        (lambda: Phonebook(num_entries=100, name_len=1, vocab_size=20), "num_entries"),
        (lambda: Phonebook(number_len=0), "number_len"),
        (lambda: Phonebook(num_entries=4, num_queries=5), "num_queries"),
        (lambda: SelectiveCopying().sample(0, make_generator(0)), "batch_size"),
        (lambda: InductionHeads().sample(2, make_generator(0), seqlen=2), "seqlen"),
        (lambda: make_generator(1.5), "seed"),
    ],
)
def test_bad_settings_are_named(make, name):
    with pytest.raises(ValueError, match=name):
        make()
