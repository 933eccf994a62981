"""Tokenizers: byte round trip, BPE training and loading, errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mambakit.training.tokenizer import ByteTokenizer, load_tokenizer, train_bpe


@given(st.text(max_size=200))
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.dtype == np.int64 and (ids < 256).all()
    assert tok.decode(ids) == text
    np.testing.assert_array_equal(tok.encode_bytes(text.encode()), ids)
    assert tok.decode([tok.eos_id, *ids.tolist(), tok.eos_id]) == text  # specials are dropped


def test_byte_vocab():
    tok = load_tokenizer("byte")
    assert (tok.vocab_size, tok.eos_id) == (257, 256)


def test_bpe_train_and_load(tmp_path):
    texts = ["def foo(x):\n    return x + 1\n", "class Bar:\n    pass\n", "héllo wörld"] * 20
    tok = train_bpe(iter(texts), 300, tmp_path / "tok.json", min_frequency=1)
    again = load_tokenizer(str(tmp_path / "tok.json"))
    assert again.vocab_size == tok.vocab_size <= 300
    for t in texts[:3]:
        ids = again.encode(t)
        assert len(ids) < len(t.encode())  # merges were learned
        assert again.decode(ids) == t
    assert again.decode([again.eos_id]) == ""
    with pytest.raises(ValueError, match="eos_token"):
        load_tokenizer(str(tmp_path / "tok.json"), eos_token="<nope>")
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(iter(texts), 100, tmp_path / "x.json")
    with pytest.raises(FileNotFoundError, match="tokenizer file"):
        load_tokenizer(str(tmp_path / "missing.json"))
