"""Tokenizers for training: a byte-level one (the default, no files needed) and `tokenizer.json` files.

Both map text to a 1-D numpy array of token ids and back, and name an end-of-document id (`eos_id`)
that the data pipeline appends to every document. `load_tokenizer("byte")` or
`load_tokenizer("path/to/tokenizer.json")` picks one; `train_bpe` makes a `tokenizer.json`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "[EOS]")


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then special tokens: eos = 256. vocab_size = 257.

    Decoding replaces invalid UTF-8 (a sample cut inside a character) and drops special tokens.
    """

    name = "byte"
    special_tokens = ("<|endoftext|>",)

    def __init__(self) -> None:
        self.eos_id = 256
        self.vocab_size = 256 + len(self.special_tokens)

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def encode_bytes(self, data: bytes) -> np.ndarray:
        """Raw bytes straight to ids (no UTF-8 decode), for reading text files fast."""
        return np.frombuffer(data, dtype=np.uint8).astype(np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class JsonTokenizer:
    """A `tokenizer.json` of the Hugging Face `tokenizers` library (BPE, WordPiece, ...).

    `eos_token` names the end-of-document token; by default the first of EOS_CANDIDATES in the vocabulary.
    """

    def __init__(self, path: str | os.PathLike, eos_token: str | None = None) -> None:
        from tokenizers import Tokenizer

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        self.name = str(path)
        self._tok = Tokenizer.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        names = (eos_token,) if eos_token else EOS_CANDIDATES
        ids = [self._tok.token_to_id(t) for t in names]
        found = [i for i in ids if i is not None]
        if not found:
            raise ValueError(
                f"tokenizer {path} has no end-of-document token among {list(names)}; "
                "pass data.eos_token naming one it has"
            )
        self.eos_id = found[0]

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def encode_bytes(self, data: bytes) -> np.ndarray:
        return self.encode(data.decode("utf-8", errors="replace"))

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


Tokenizer = ByteTokenizer | JsonTokenizer


def load_tokenizer(spec: str, eos_token: str | None = None) -> Tokenizer:
    """`"byte"` for the byte-level tokenizer, else the path of a `tokenizer.json`."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"tokenizer must be 'byte' or the path of a tokenizer.json, got {spec!r}")
    if spec == "byte":
        return ByteTokenizer()
    return JsonTokenizer(spec, eos_token)


def train_bpe(
    texts: Iterator[str], vocab_size: int, out: str | os.PathLike, min_frequency: int = 2
) -> JsonTokenizer:
    """Train a byte-level BPE tokenizer (GPT-2 pre-tokenization) on `texts`; write it to `out` as JSON.

    The vocabulary starts from the 256 bytes, so every text is encodable; `<|endoftext|>` is added as eos.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 257:
        raise ValueError(f"vocab_size must be an int >= 257 (256 bytes + eos), got {vocab_size!r}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    return JsonTokenizer(out)
