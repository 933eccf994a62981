"""Where a run's token files live and when they are rebuilt: `prepare_data(cfg, tokenizer, info)`.

Token files go to data.cache_dir when set, else to `<train.out>/.token-cache/<hash>`, the hash covering
the source (path, number of files, bytes, newest modification time) and every setting that changes the
tokens: runs that read the same data the same way share one copy (the default run's 30M stdlib tokens
are built once), and edited data is tokenized again. Rank 0 builds; the other processes wait.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from mambakit.training import distributed as D
from mambakit.training.config import TrainConfig
from mambakit.training.data import PackedRows, TokenFile, build_token_files, iter_documents, stdlib_source_dir


def _source_fingerprint(source: Path, glob: str) -> list[int]:
    """(files, bytes, newest mtime) of what a source reads, so that edited data is tokenized again."""
    files = (
        [source]
        if source.is_file()
        else [f for f in source.glob(glob if source.is_dir() else "*") if f.is_file()]
    )
    stats = [f.stat() for f in files]
    return [len(stats), sum(st.st_size for st in stats), max((st.st_mtime_ns for st in stats), default=0)]


def prepare_data(cfg: TrainConfig, tokenizer, info: D.DistInfo):
    """Token files for `cfg.data`, built by rank 0 unless already there; returns (train PackedRows,
    val PackedRows or None). A new cache directory is filled under a temporary name, then renamed."""
    d = cfg.data
    source = Path(d.path) if d.path is not None else stdlib_source_dir()
    glob = d.glob or ("**/*.py" if d.path is None else "**/*")
    if not source.exists():
        raise FileNotFoundError(f"data.path {source} does not exist")
    key = {
        "source": str(source.resolve()),
        "files_bytes_mtime": _source_fingerprint(source, glob),
        "format": d.format,
        "glob": glob,
        "text_field": d.text_field,
        "hf_split": d.hf_split,
        "tokenizer": tokenizer.name,
        "eos_id": tokenizer.eos_id,
        "val_fraction": d.val_fraction,
        "seed": cfg.train.seed,
        "max_tokens": d.max_tokens,
        "min_val_tokens": 4 * d.seq_len + 1,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(d.cache_dir) if d.cache_dir else Path(cfg.train.out) / ".token-cache" / digest
    if info.is_main and not _cache_matches(cache, key):
        build_dir = cache if d.cache_dir else cache.with_name(f".tmp-{digest}-{os.getpid()}")
        (build_dir / "source.json").unlink(missing_ok=True)
        docs = iter_documents(source, d.format, d.text_field, glob, d.hf_split)
        build_token_files(
            docs, tokenizer, build_dir, d.val_fraction, cfg.train.seed, key["min_val_tokens"], d.max_tokens
        )
        (build_dir / "source.json").write_text(json.dumps(key, indent=1) + "\n")
        if build_dir != cache:
            try:
                build_dir.rename(cache)
            except OSError:  # another run built the same files meanwhile (or a stale copy is there)
                shutil.rmtree(cache, ignore_errors=True)
                build_dir.rename(cache)
    D.barrier(info)
    train_rows = PackedRows(TokenFile(cache / "train"), d.seq_len)
    val_rows = PackedRows(TokenFile(cache / "val"), d.seq_len) if d.val_fraction > 0 else None
    return train_rows, val_rows


def _cache_matches(cache: Path, key: dict) -> bool:
    path = cache / "source.json"
    return path.is_file() and json.loads(path.read_text()) == key
