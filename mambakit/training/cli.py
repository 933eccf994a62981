"""`mambakit train`: flags and a TOML file onto a TrainConfig, then `trainer.train`.

With no arguments it trains a small byte-level Mamba-2 on the running interpreter's standard library
source. Every config field is a flag (`--train.steps 100`, `--model.ssm.d_state 16`); common ones have
short forms (`--steps`, `--preset`, `--data`, ...); `--set KEY=VALUE` sets any key. Precedence:
defaults < `--config FILE` (or the run's own config.toml with `--resume`) < flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
from pathlib import Path

from mambakit.models.config import AttentionConfig, MLPConfig, ModelConfig, SSMConfig
from mambakit.training.config import SECTIONS, load_config

SHORTCUTS = {
    "preset": (
        "model.preset",
        "model preset name (e.g. tiny-mamba2, hybrid-tiny); alone it means the preset as is",
    ),
    "data": ("data.path", "text file, directory of text files, .jsonl, or a saved HF dataset directory"),
    "tokenizer": ("data.tokenizer", "'byte' (default) or a tokenizer.json"),
    "steps": ("train.steps", "optimizer steps"),
    "batch_size": ("train.batch_size", "global batch in rows"),
    "seq_len": ("data.seq_len", "tokens a row"),
    "lr": ("optim.lr", "peak learning rate"),
    "out": ("train.out", "parent directory of run directories"),
    "name": ("train.name", "run directory name"),
    "device": ("train.device", "auto, cpu, cuda, cuda:N"),
    "seed": ("train.seed", "seed of init, shuffling and split"),
}


def _model_fields() -> list[str]:
    keys = ["model.preset"]
    nested = {"ssm": SSMConfig, "attn": AttentionConfig, "mlp": MLPConfig}
    for f in dataclasses.fields(ModelConfig):
        if f.name in nested:
            keys += [f"model.{f.name}.{g.name}" for g in dataclasses.fields(nested[f.name])]
        else:
            keys.append(f"model.{f.name}")
    return keys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.allow_abbrev = False  # --data must never be read as a prefix of --data.path
    parser.add_argument("--config", metavar="FILE", help="TOML file of settings")
    parser.add_argument(
        "--resume", metavar="RUN_DIR", help="continue a run (its newest checkpoint) or a checkpoint dir"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="set any key, e.g. optim.lr=1e-3"
    )
    for flag, (key, help_text) in SHORTCUTS.items():
        parser.add_argument(
            f"--{flag.replace('_', '-')}",
            dest=key,
            default=argparse.SUPPRESS,
            metavar=flag.upper(),
            help=f"{help_text} ({key})",
        )
    for name, cls in SECTIONS.items():
        group = parser.add_argument_group(f"[{name}]", cls.__doc__)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            group.add_argument(f"--{name}.{f.name}", dest=f"{name}.{f.name}", default=argparse.SUPPRESS,
                               metavar="V", help=f"default: {default!r}")  # fmt: skip
    group = parser.add_argument_group("[model]", "a preset plus overrides of any ModelConfig field")
    for key in _model_fields():
        group.add_argument(f"--{key}", dest=key, default=argparse.SUPPRESS, metavar="V")


def _run_dir_of(resume: str) -> Path:
    path = Path(resume)
    return path.parent.parent if (path / "trainer_state.pt").is_file() else path


def run(args: argparse.Namespace) -> int:
    from mambakit.training.trainer import train

    overrides: list[tuple[str, str]] = [(k, v) for k, v in vars(args).items() if "." in k]
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        overrides.append((key.strip(), value.strip()))
    config_path = args.config
    if args.resume and config_path is None:
        saved = _run_dir_of(args.resume) / "config.toml"
        config_path = saved if saved.is_file() else None
    try:
        cfg = load_config(config_path, overrides)
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise SystemExit(f"mambakit train: {e}") from None
    try:
        result = train(cfg, resume=args.resume)
    except (FileExistsError, FileNotFoundError) as e:  # a wrong path or run name: no traceback needed
        raise SystemExit(f"mambakit train: {e}") from None
    if result.interrupted in ("SIGTERM", "SIGINT"):
        return 128 + int(getattr(signal, result.interrupted))
    return 0
