"""Shared pieces of the training tests: a small text corpus and a config for a model small enough to
train a handful of steps in well under a second."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from mambakit.training.config import TrainConfig, load_config

WORDS = "state space model selective scan chunk token layer mamba hybrid attention byte packed".split()


def write_corpus(directory: Path, n_docs: int = 24, seed: int = 0) -> Path:
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 60))]
        (directory / f"doc{i:03d}.txt").write_text(" ".join(words) + "\n")
    return directory


def tiny_overrides(data: Path, out: Path, **extra) -> dict:
    over = {
        "model.preset": "hybrid-tiny",
        "model.d_model": 32,
        "model.pattern": "M*-M",
        "model.attn.num_heads": 2,
        "model.attn.num_kv_heads": 1,
        "model.mlp.d_intermediate": 32,
        "model.ssm.d_state": 8,
        "data.path": str(data),
        "data.seq_len": 16,
        "data.val_fraction": 0.1,
        "train.steps": 6,
        "train.batch_size": 4,
        "train.micro_batch_size": 2,
        "train.out": str(out),
        "train.name": "run",
        "train.progress": False,
        "train.sample_tokens": 0,
        "train.eval_every": 3,
        "train.eval_batches": 1,
        "train.save_every": 3,
        "train.log_every": 1,
        "train.threads": 1,
        "optim.warmup_steps": 2,
        "optim.lr": 1e-2,
    }
    over.update(extra)
    return over


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_corpus(tmp_path / "corpus")


def tiny_config(data: Path, out: Path, **extra) -> TrainConfig:
    return load_config(None, tiny_overrides(data, out, **extra))
