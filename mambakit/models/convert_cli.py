"""`mambakit convert SRC DST --to {mambakit,hf,official}`: read a checkpoint directory in any supported
format (detected from its config.json) and write it in another.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from mambakit.models.config import CONFIG_NAME
from mambakit.models.formats import FORMATS, detect_format, load_checkpoint, save_checkpoint

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _size(text: str) -> int:
    """'5GB', '200MB', '64KB' or a byte count -> bytes (powers of 1000, as transformers counts them)."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    t = text.strip().upper()
    for unit, scale in units.items():
        if t.endswith(unit):
            t, mult = t[: -len(unit)], scale
            break
    else:
        mult = 1
    try:
        n = int(float(t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--max-shard-size: expected bytes like 5GB or 200MB, got {text!r}"
        ) from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"--max-shard-size must be positive, got {text!r}")
    return n


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="checkpoint directory (mambakit, official or HF format)")
    parser.add_argument("dst", metavar="DST", help="directory to write")
    parser.add_argument(
        "--to", choices=FORMATS, default="mambakit", help="format to write (default mambakit)"
    )
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="cast the weights first")
    parser.add_argument(
        "--max-shard-size", type=_size, default=None, help="hf only: shard the weights (e.g. 5GB)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in DST")


def run(args: argparse.Namespace) -> int:
    """Convert; returns 0, or 2 with a message on stderr when the input or the request is bad."""
    src, dst = Path(args.src), Path(args.dst)
    try:
        if args.max_shard_size is not None and args.to != "hf":
            raise ValueError("--max-shard-size applies to --to hf only")
        if src.resolve() == dst.resolve():
            raise ValueError(f"SRC and DST are the same directory ({src}): write to another one")
        if (dst / CONFIG_NAME).exists() and not args.overwrite:
            raise ValueError(
                f"{dst} already holds a checkpoint ({CONFIG_NAME}); pass --overwrite to replace it"
            )
        fmt = detect_format(src)
        model = load_checkpoint(src, format=fmt, dtype=_DTYPES.get(args.dtype))
        options = {"max_shard_size": args.max_shard_size} if args.to == "hf" else {}
        save_checkpoint(model, dst, format=args.to, **options)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"mambakit convert: {e}", file=sys.stderr)
        return 2
    n = model.num_parameters()
    print(f"converted {src} ({fmt}) -> {dst} ({args.to}): {model.config.n_layer} layers, {n:,} parameters")
    return 0
