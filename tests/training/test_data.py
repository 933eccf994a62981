"""Data pipeline: sources, memmap token files, packing with seq_idx, seeded sampling, sharding, val split."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mambakit.training.data import (
    IGNORE_INDEX,
    PackedRows,
    StepSampler,
    TokenFile,
    build_token_files,
    iter_documents,
    shard_rows,
    write_token_file,
)
from mambakit.training.tokenizer import ByteTokenizer


def _random_docs(rng: np.random.Generator, n: int, max_len: int, vocab: int) -> list[np.ndarray]:
    return [rng.integers(0, vocab, size=int(rng.integers(1, max_len))) for _ in range(n)]


@pytest.mark.parametrize("seed", range(6))
def test_packing_seq_idx_and_every_token_once(tmp_path, seed):
    rng = np.random.default_rng(seed)
    vocab = int(rng.choice([300, 70000]))  # uint16 and uint32 files
    docs = _random_docs(rng, int(rng.integers(1, 30)), 40, vocab)
    tf = write_token_file(tmp_path / "t", docs, vocab)
    assert tf.tokens.dtype == (np.uint16 if vocab <= 2**16 else np.uint32)
    stream = np.concatenate(docs)
    doc_of = np.concatenate([np.full(len(d), i) for i, d in enumerate(docs)])
    seq_len = int(rng.integers(1, 17))
    rows = PackedRows(tf, seq_len)
    assert len(rows) == (len(stream) - 1) // seq_len
    seen = []
    for i in range(len(rows)):
        ids, targets, seq_idx = rows.row(i)
        pos = np.arange(i * seq_len, (i + 1) * seq_len)
        np.testing.assert_array_equal(ids, stream[pos])
        seen.append(ids)
        # seq_idx starts at 0 and steps by one exactly where the document changes
        assert seq_idx[0] == 0
        np.testing.assert_array_equal(seq_idx, doc_of[pos] - doc_of[pos[0]])
        same = doc_of[pos + 1] == doc_of[pos]
        np.testing.assert_array_equal(targets[same], stream[pos + 1][same])
        assert (targets[~same] == IGNORE_INDEX).all()
        assert rows.num_targets([i]) == int(same.sum())
    # every token that can start a row appears exactly once, in order
    if seen:
        np.testing.assert_array_equal(np.concatenate(seen), stream[: len(rows) * seq_len])
    batch = rows.batch(list(range(len(rows)))) if len(rows) else None
    if batch is not None:
        assert batch.input_ids.shape == batch.seq_idx.shape == (len(rows), seq_len)
        assert batch.num_targets == rows.num_targets(range(len(rows)))


def test_memmap_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    docs = _random_docs(rng, 5, 100, 257)
    write_token_file(tmp_path / "x", docs, 257)
    again = TokenFile(tmp_path / "x")
    assert isinstance(again.tokens, np.memmap)
    np.testing.assert_array_equal(np.asarray(again.tokens), np.concatenate(docs))
    np.testing.assert_array_equal(again.doc_starts, np.cumsum([0] + [len(d) for d in docs[:-1]]))
    assert (tmp_path / "x.tokens").stat().st_size == 2 * sum(len(d) for d in docs)


def test_sampler_deterministic_by_seed_and_a_permutation_each_epoch():
    a, b, c = StepSampler(37, 5, seed=3), StepSampler(37, 5, seed=3), StepSampler(37, 5, seed=4)
    steps = range(0, 30)
    ra = np.concatenate([a.rows_for_step(s) for s in steps])
    np.testing.assert_array_equal(ra, np.concatenate([b.rows_for_step(s) for s in steps]))
    assert not np.array_equal(ra, np.concatenate([c.rows_for_step(s) for s in steps]))
    # the first 37 positions visit every row once; epoch 2 is another order
    assert sorted(ra[:37]) == list(range(37))
    assert sorted(ra[37:74]) == list(range(37))
    assert not np.array_equal(ra[:37], ra[37:74])
    # stateless: asking for a late step first gives the same rows
    np.testing.assert_array_equal(StepSampler(37, 5, seed=3).rows_for_step(17), a.rows_for_step(17))


def test_shard_rows_covers_the_global_batch():
    rows = np.arange(12)
    one = shard_rows(rows, 3, 0, 1)
    two = shard_rows(rows, 3, 0, 2) + shard_rows(rows, 3, 1, 2)
    assert sorted(np.concatenate(one)) == sorted(np.concatenate(two)) == list(range(12))
    with pytest.raises(ValueError, match="batch_size"):
        shard_rows(rows, 5, 0, 1)


def test_sources_text_dir_jsonl(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.txt").write_text("bee")
    (tmp_path / "d" / "sub" / "a.txt").write_text("ay")
    (tmp_path / "d" / "bin.dat").write_bytes(b"\0\1\2")
    (tmp_path / "d" / ".hidden").write_text("no")
    (tmp_path / "d" / "r.jsonl").write_text(
        json.dumps({"text": "j1"}) + "\n\n" + json.dumps({"text": "j2"}) + "\n"
    )
    docs = list(iter_documents(tmp_path / "d"))
    assert docs == [b"bee", "j1", "j2", b"ay"]
    assert list(iter_documents(tmp_path / "d", glob="**/*.txt")) == [b"bee", b"ay"]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="text_field"):
        list(iter_documents(tmp_path / "bad.jsonl"))
    with pytest.raises(FileNotFoundError, match="data.path"):
        list(iter_documents(tmp_path / "missing"))
    with pytest.raises(ValueError, match="data.format"):
        list(iter_documents(tmp_path / "d", fmt="csv"))


def test_hf_dataset_on_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["one", "two"]}).save_to_disk(str(tmp_path / "ds"))
    assert list(iter_documents(tmp_path / "ds")) == ["one", "two"]
    splits = {"train": ["a", "b", "c"], "test": ["z"]}
    dd = datasets.DatasetDict({k: datasets.Dataset.from_dict({"body": v}) for k, v in splits.items()})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert list(iter_documents(tmp_path / "dd", text_field="body")) == ["a", "b", "c"]
    assert list(iter_documents(tmp_path / "dd", text_field="body", hf_split="test")) == ["z"]
    with pytest.raises(ValueError, match="hf_split"):
        list(iter_documents(tmp_path / "dd", text_field="body", hf_split="dev"))
    with pytest.raises(ValueError, match="text_field"):
        list(iter_documents(tmp_path / "dd"))


def test_build_split_by_document_and_tail_fallback(tmp_path):
    tok = ByteTokenizer()
    docs = [f"document number {i} " * 3 for i in range(40)]
    train, val = build_token_files(iter(docs), tok, tmp_path / "a", 0.1, seed=1, min_val_tokens=10)
    expected_val = [d for i, d in enumerate(docs) if (i + 1) % 10 == 0]
    assert val.doc_starts.tolist() == list(np.cumsum([0] + [len(d) + 1 for d in expected_val[:-1]]))
    assert len(train) + len(val) == sum(len(d) + 1 for d in docs)
    assert tok.decode(val.tokens[: len(expected_val[0]) + 1]) == expected_val[0]
    assert int(val.tokens[0]) == tok.eos_id  # every document starts with eos
    # one document: validation is the tail of the stream, cut into its own document
    train, val = build_token_files(iter(["x" * 100]), tok, tmp_path / "b", 0.1, seed=0, min_val_tokens=30)
    assert (len(train), len(val)) == (71, 30)
    assert val.doc_starts.tolist() == [0] and train.doc_starts.tolist() == [0]
    # max_tokens stops after the document that reaches it
    train, val = build_token_files(
        iter(docs), tok, tmp_path / "m", 0.0, seed=0, min_val_tokens=1, max_tokens=100
    )
    assert val is None and len(train) == sum(len(d) + 1 for d in docs[:2])
    with pytest.raises(ValueError, match="val_fraction"):
        build_token_files(iter(docs), tok, tmp_path / "c", 1.5, seed=0, min_val_tokens=1)
