"""Training data: documents from files, jsonl or saved HF datasets -> a memory-mapped token file ->
fixed-length packed rows with `seq_idx` -> deterministic shuffled batches, plus a held-out split.

Pipeline: `iter_documents` reads a source one document at a time; `build_token_files` tokenizes each,
puts the tokenizer's end-of-text token in front of it (GPT-2's `<|endoftext|>` used as a document
start, so every document, and a sample from an empty prompt, begins with it), and streams the ids to
`train.tokens` / `val.tokens` (raw uint16 or uint32, so a corpus larger than RAM is never in memory)
beside `*.docs.npy` (document start offsets) and `*.json` (dtype and counts).
`PackedRows` cuts a token file into rows of `seq_len` consecutive tokens: row i holds tokens
[i * seq_len, (i + 1) * seq_len) and its targets are the next tokens; `seq_idx` numbers the documents
inside the row from 0 so no state crosses a document boundary, and a target from another document is
masked with IGNORE_INDEX. `StepSampler` maps a global step to its rows through a per-epoch permutation
seeded by (seed, epoch): the data position is a pure function of the step, which makes resume exact.
"""

from __future__ import annotations

import json
import math
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mambakit.training.tokenizer import Tokenizer

IGNORE_INDEX = -100
_HF_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")
_SKIP_PARTS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_source_dir() -> Path:
    """The Python standard library source of the running interpreter: the default training corpus."""
    return Path(sysconfig.get_paths()["stdlib"])


def detect_format(path: Path) -> str:
    """'hf' (a `datasets.save_to_disk` directory), 'jsonl' (a .jsonl/.json file) or 'text'."""
    if path.is_dir():
        return "hf" if any((path / m).is_file() for m in _HF_MARKERS) else "text"
    if path.suffix in (".jsonl", ".json"):
        return "jsonl"
    return "text"


def _looks_binary(data: bytes) -> bool:
    return b"\0" in data[:8192]


def _text_files(path: Path, glob: str) -> Iterator[Path]:
    if path.is_file():
        yield path
        return
    for f in sorted(path.glob(glob)):
        rel = f.relative_to(path).parts
        if f.is_file() and not any(p.startswith(".") or p in _SKIP_PARTS for p in rel):
            yield f


def iter_documents(path: str | os.PathLike, fmt: str = "auto", text_field: str = "text", glob: str = "**/*",
                   hf_split: str = "train") -> Iterator[str | bytes]:  # fmt: skip
    """Yield the documents of a source in a fixed order: a text file is one document (bytes); a
    directory gives its files matching `glob` in sorted order (binary files skipped, .jsonl files read
    as jsonl); a jsonl file gives each line's `text_field`; a saved HF dataset gives its `text_field`
    column (split `hf_split` of a DatasetDict)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data.path {path} does not exist")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "hf":
        yield from _iter_hf(path, text_field, hf_split)
    elif fmt == "jsonl":
        yield from _iter_jsonl(path, text_field)
    elif fmt == "text":
        for f in _text_files(path, glob):
            if f.suffix == ".jsonl" and f != path:
                yield from _iter_jsonl(f, text_field)
                continue
            data = f.read_bytes()
            if data and not _looks_binary(data):
                yield data
    else:
        raise ValueError(f"data.format must be 'auto', 'text', 'jsonl' or 'hf', got {fmt!r}")


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record, dict) or text_field not in record:
                raise ValueError(f"{path}:{lineno} has no field data.text_field={text_field!r}")
            yield str(record[text_field])


def _iter_hf(path: Path, text_field: str, split: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise ImportError(f"{path} is a saved HF dataset: reading it needs `pip install datasets`") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"data.hf_split={split!r} is not a split of {path}: {sorted(ds)}")
        ds = ds[split]
    if text_field not in ds.column_names:
        raise ValueError(f"data.text_field={text_field!r} is not a column of {path}: {ds.column_names}")
    for batch in ds.iter(batch_size=1024):
        yield from (str(t) for t in batch[text_field])


class TokenFile:
    """A memory-mapped token file: `tokens` (n,) uint16/uint32 and `doc_starts` (ndocs,) int64."""

    def __init__(self, prefix: str | os.PathLike) -> None:
        prefix = Path(prefix)
        meta = json.loads(Path(f"{prefix}.json").read_text())
        self.dtype = np.dtype(meta["dtype"])
        self.num_tokens = int(meta["num_tokens"])
        self.tokens = (
            np.memmap(f"{prefix}.tokens", dtype=self.dtype, mode="r", shape=(self.num_tokens,))
            if self.num_tokens
            else np.zeros(0, dtype=self.dtype)
        )
        self.doc_starts = np.load(f"{prefix}.docs.npy")

    def __len__(self) -> int:
        return self.num_tokens


class TokenFileWriter:
    """Streams documents into `<prefix>.tokens` + `<prefix>.docs.npy` + `<prefix>.json`."""

    def __init__(self, prefix: str | os.PathLike, vocab_size: int) -> None:
        self.prefix = Path(prefix)
        self.dtype = np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)
        self._f = open(f"{self.prefix}.tokens", "wb")  # noqa: SIM115 (closed in close())
        self.doc_starts: list[int] = []
        self.num_tokens = 0

    def add(self, ids: np.ndarray) -> None:
        self.doc_starts.append(self.num_tokens)
        ids.astype(self.dtype).tofile(self._f)
        self.num_tokens += len(ids)

    def close(self) -> None:
        self._f.close()
        np.save(f"{self.prefix}.docs.npy", np.asarray(self.doc_starts, dtype=np.int64))
        meta = {"dtype": self.dtype.name, "num_tokens": self.num_tokens, "num_docs": len(self.doc_starts)}
        Path(f"{self.prefix}.json").write_text(json.dumps(meta) + "\n")


def write_token_file(prefix: str | os.PathLike, docs: list[np.ndarray], vocab_size: int) -> TokenFile:
    """Write documents (each already holding its eos if wanted) as one token file; returns it opened."""
    w = TokenFileWriter(prefix, vocab_size)
    for d in docs:
        w.add(np.asarray(d))
    w.close()
    return TokenFile(prefix)


def build_token_files(
    documents: Iterator[str | bytes],
    tokenizer: Tokenizer,
    out_dir: str | os.PathLike,
    val_fraction: float,
    seed: int,
    min_val_tokens: int,
    max_tokens: int | None = None,
) -> tuple[TokenFile, TokenFile | None]:
    """Tokenize `documents` (each preceded by eos) into `out_dir/train.*` and `out_dir/val.*`.

    Split by document: with period p = round(1 / val_fraction), document i goes to validation when
    (i + seed) % p == 0. A corpus with too few documents for that (no validation document) gives the
    last max(min_val_tokens, val_fraction * n) tokens (at most half) of its stream to validation
    instead; so does one whose documents all went to validation. Stops after
    `max_tokens` tokens (whole documents) when given. Returns (train, val or None).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    period = max(2, round(1 / val_fraction)) if val_fraction > 0 else 0
    train = TokenFileWriter(out_dir / "train", tokenizer.vocab_size)
    val = TokenFileWriter(out_dir / "val", tokenizer.vocab_size) if period else None
    eos = np.asarray([tokenizer.eos_id], dtype=np.int64)
    total = 0
    for i, doc in enumerate(documents):
        ids = tokenizer.encode_bytes(doc) if isinstance(doc, bytes) else tokenizer.encode(doc)
        if len(ids) == 0:
            continue
        ids = np.concatenate([eos, ids])
        (val if val is not None and (i + seed) % period == 0 else train).add(ids)
        total += len(ids)
        if max_tokens is not None and total >= max_tokens:
            break
    train.close()
    if val is None:
        return TokenFile(out_dir / "train"), None
    val.close()
    if train.num_tokens == 0:  # every document went to validation: start from the whole stream instead
        for ext in (".tokens", ".docs.npy", ".json"):
            os.replace(out_dir / f"val{ext}", out_dir / f"train{ext}")
        _move_tail_to_val(out_dir, max(min_val_tokens, math.ceil(val_fraction * val.num_tokens)))
    elif val.num_tokens == 0:
        _move_tail_to_val(out_dir, max(min_val_tokens, math.ceil(val_fraction * train.num_tokens)))
    return TokenFile(out_dir / "train"), TokenFile(out_dir / "val")


def _move_tail_to_val(out_dir: Path, n_val: int) -> None:
    """Cut the last `n_val` tokens (at most half) of the train file into a new val file."""
    src = TokenFile(out_dir / "train")
    n_val = min(n_val, src.num_tokens // 2)
    if n_val == 0:
        raise ValueError("the corpus is too small to hold out a validation split; set data.val_fraction = 0")
    cut = src.num_tokens - n_val
    dtype, starts = src.dtype, src.doc_starts
    tail = np.array(src.tokens[cut:])
    del src  # close the memmap before truncating its file
    # the cut opens a validation document (unless a document starts exactly there)
    splits = {
        "val": (np.concatenate([[0], starts[starts > cut] - cut]), n_val),
        "train": (starts[starts < cut], cut),
    }
    tail.tofile(out_dir / "val.tokens")
    os.truncate(out_dir / "train.tokens", cut * dtype.itemsize)
    for prefix, (doc_starts, n) in splits.items():
        np.save(out_dir / f"{prefix}.docs.npy", doc_starts.astype(np.int64))
        meta = {"dtype": dtype.name, "num_tokens": int(n), "num_docs": len(doc_starts)}
        (out_dir / f"{prefix}.json").write_text(json.dumps(meta) + "\n")


@dataclass
class Batch:
    """input_ids, targets, seq_idx: (rows, seq_len); targets are IGNORE_INDEX where the next token
    belongs to another document."""

    input_ids: torch.Tensor
    targets: torch.Tensor
    seq_idx: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) for t in (self.input_ids, self.targets, self.seq_idx)))

    @property
    def num_targets(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())


class PackedRows:
    """Rows of `seq_len` consecutive tokens of a token file, with next-token targets and seq_idx."""

    def __init__(self, tokens: TokenFile, seq_len: int) -> None:
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
            raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
        self.file = tokens
        self.seq_len = seq_len
        # the last token has no target: it can start no row of its own
        self.num_rows = max(0, (len(tokens) - 1) // seq_len)

    def __len__(self) -> int:
        return self.num_rows

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(input_ids, targets, seq_idx), each (seq_len,) int64."""
        if not 0 <= i < self.num_rows:
            raise IndexError(f"row {i} out of range [0, {self.num_rows})")
        start = i * self.seq_len
        ids = np.asarray(self.file.tokens[start : start + self.seq_len + 1], dtype=np.int64)
        doc = np.searchsorted(self.file.doc_starts, np.arange(start, start + self.seq_len + 1), "right") - 1
        targets = np.where(doc[1:] == doc[:-1], ids[1:], IGNORE_INDEX)
        return ids[:-1], targets, (doc[:-1] - doc[0])

    def batch(self, rows: np.ndarray | list[int]) -> Batch:
        parts = [self.row(int(i)) for i in rows]
        stacked = [torch.from_numpy(np.stack([p[k] for p in parts])) for k in range(3)]
        return Batch(stacked[0], stacked[1], stacked[2].to(torch.int32))

    def num_targets(self, rows: np.ndarray | list[int]) -> int:
        """Number of unmasked targets in `rows`, from the document offsets alone (no token reads)."""
        total = 0
        for i in rows:
            start = int(i) * self.seq_len
            # a boundary between positions t and t+1 masks one target: count the starts inside (start, end]
            lo, hi = np.searchsorted(self.file.doc_starts, [start + 1, start + self.seq_len + 1], "left")
            total += self.seq_len - int(hi - lo)
        return total


class StepSampler:
    """Rows of each global step: step s takes positions [s * batch_size, (s + 1) * batch_size) of an
    endless stream that visits every row once an epoch, in the order of a permutation seeded by
    (seed, epoch). Stateless: the rows of a step depend only on (seed, num_rows, batch_size, step)."""

    def __init__(self, num_rows: int, batch_size: int, seed: int, shuffle: bool = True) -> None:
        if num_rows <= 0:
            raise ValueError("the training split has no full row: give more data or a shorter data.seq_len")
        self.num_rows, self.batch_size, self.seed, self.shuffle = num_rows, batch_size, seed, shuffle
        self._epoch, self._perm = -1, np.arange(0)

    def permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_rows)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm, self._epoch = torch.randperm(self.num_rows, generator=g).numpy(), epoch
        return self._perm

    def rows_for_step(self, step: int) -> np.ndarray:
        pos = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
        epochs, idx = pos // self.num_rows, pos % self.num_rows
        return np.asarray([self.permutation(int(e))[i] for e, i in zip(epochs, idx)], dtype=np.int64)

    def epoch_of_step(self, step: int) -> float:
        return step * self.batch_size / self.num_rows


def shard_rows(rows: np.ndarray, micro_batch_size: int, rank: int, world_size: int) -> list[np.ndarray]:
    """The micro-batches of one rank: micro-batch j of the global batch goes to rank j % world_size.

    rows (batch_size,) -> list of accum_steps arrays of micro_batch_size rows each.
    """
    per_micro = micro_batch_size
    n_micro = len(rows) // per_micro
    if n_micro * per_micro != len(rows) or n_micro % world_size:
        raise ValueError(
            f"train.batch_size={len(rows)} must be a multiple of "
            f"train.micro_batch_size * world_size = {per_micro} * {world_size}"
        )
    return [rows[j * per_micro : (j + 1) * per_micro] for j in range(rank, n_micro, world_size)]
