"""`mambakit tokenizer train`: train a byte-level BPE `tokenizer.json` on the same sources as training.

Example: `mambakit tokenizer train --data corpus/ --vocab-size 8192 --out tokenizer.json`, then
`mambakit train --data corpus/ --tokenizer tokenizer.json`. Without --data it reads the stdlib source.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from mambakit.training.data import iter_documents, stdlib_source_dir
from mambakit.training.tokenizer import train_bpe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("train", help="train a byte-level BPE tokenizer and write tokenizer.json")
    p.add_argument("--data", help="text file, directory, .jsonl or saved HF dataset (default: stdlib source)")
    p.add_argument("--format", default="auto", choices=("auto", "text", "jsonl", "hf"))
    p.add_argument("--text-field", default="text", help="field of jsonl records / dataset column")
    p.add_argument("--glob", default=None, help="files of a directory (default **/*, **/*.py for stdlib)")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("--max-docs", type=int, default=None, help="read at most this many documents")
    p.add_argument("--out", default="tokenizer.json", help="output file")


def run(args: argparse.Namespace) -> int:
    source = Path(args.data) if args.data else stdlib_source_dir()
    glob = args.glob or ("**/*" if args.data else "**/*.py")
    docs = iter_documents(source, args.format, args.text_field, glob)
    texts = (d.decode("utf-8", errors="replace") if isinstance(d, bytes) else d for d in docs)
    if args.max_docs is not None:
        texts = itertools.islice(texts, args.max_docs)
    try:
        tok = train_bpe(texts, args.vocab_size, args.out, args.min_frequency)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"mambakit tokenizer: {e}") from None
    print(f"wrote {args.out}: vocabulary {tok.vocab_size}, eos id {tok.eos_id}")
    return 0
