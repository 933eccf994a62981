"""The one command line: `mambakit <command> ...`.

Each command lives in its own module that defines `add_arguments(parser)` and `run(args) -> int`;
this file only maps names to modules, so a command's code sits beside the part of the library it drives.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("mambakit.commands.info", "print versions, backends and devices"),
    "demo": ("mambakit.commands.demo", "build small models, check decoding against the full forward"),
    "train": ("mambakit.training.cli", "train a model (default: a byte-level model on the stdlib source)"),
    "task": ("mambakit.tasks.cli", "run a synthetic task (selective copying, induction heads, ...)"),
    "generate": ("mambakit.inference.cli", "generate text from a checkpoint directory"),
    "convert": ("mambakit.models.convert_cli", "convert a checkpoint between formats"),
    "tokenizer": ("mambakit.training.tokenizer_cli", "train a BPE tokenizer"),
    "plot": ("mambakit.training.plot", "plot the curves of a training run"),
}


def _available() -> dict[str, tuple[str, str]]:
    return {name: entry for name, entry in COMMANDS.items() if importlib.util.find_spec(entry[0]) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mambakit", description="Selective state space models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in _available().items():
        module = importlib.import_module(module_name)
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(_available()[args.command][0])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
