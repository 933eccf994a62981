"""`mambakit train`, `mambakit tokenizer train` and `mambakit plot` end to end, on tiny settings."""

from __future__ import annotations

import pytest
import torch

from mambakit.cli import build_parser, main
from mambakit.models import from_pretrained
from mambakit.training.checkpoint import latest_checkpoint
from mambakit.training.config import load_config, read_toml
from mambakit.training.trainer import train
from tests.training.conftest import tiny_config, tiny_overrides


def _flags(over: dict) -> list[str]:
    def fmt(v):
        return ("true" if v else "false") if isinstance(v, bool) else str(v)

    return [f"--{k}={fmt(v)}" for k, v in over.items()]


def test_train_cli_end_to_end(corpus, tmp_path, capsys):
    over = tiny_overrides(corpus, tmp_path / "runs", **{"train.sample_tokens": 20, "train.steps": 4})
    del over["data.path"], over["train.out"]
    args = ["train", "--data", str(corpus), "--out", str(tmp_path / "runs"), "--seed", "3", *_flags(over)]
    assert main(args) == 0
    run = tmp_path / "runs" / "run"
    out = capsys.readouterr()
    assert "sample (prompt 'def ')" in out.out + out.err
    assert (run / "metrics.csv").is_file() and (run / "tb").is_dir()
    resolved = read_toml(run / "config.toml")
    assert resolved["train"]["seed"] == 3 and resolved["data"]["path"] == str(corpus)
    assert resolved["model"]["d_model"] == 32 and resolved["model"]["vocab_size"] == 257
    ckpt = latest_checkpoint(run)
    assert ckpt.name == "step_00000004"
    model = from_pretrained(ckpt)
    assert model.config.pattern == "M*-M"

    # resume through the CLI: the run's own config.toml, with a flag raising the step count
    assert main(["train", "--resume", str(run), "--train.steps", "6"]) == 0
    assert latest_checkpoint(run).name == "step_00000006"
    assert read_toml(run / "config.toml")["train"]["steps"] == 6

    # a new run never writes into a directory that already has checkpoints
    with pytest.raises(SystemExit, match="--resume"):
        main(args)
    with pytest.raises(SystemExit, match="no checkpoint"):
        main(["train", "--resume", str(tmp_path)])

    # the resolved config reproduces the run's config
    again = load_config(run / "config.toml")
    assert again.model["d_model"] == 32 and again.train.steps == 6

    # plot writes PNG files
    assert main(["plot", str(run)]) == 0
    for name in ("loss.png", "throughput.png"):
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_cli_errors(tmp_path):
    with pytest.raises(SystemExit, match="train.steps"):
        main(["train", "--steps", "many", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        main(["train", "--set", "train.steps", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):  # argparse: an unknown flag
        build_parser().parse_args(["train", "--train.stepz", "3"])
    with pytest.raises(SystemExit, match="metrics.csv"):
        main(["plot", str(tmp_path)])


def test_bpe_tokenizer_cli_then_train(corpus, tmp_path):
    tok = tmp_path / "tok.json"
    assert main(["tokenizer", "train", "--data", str(corpus), "--vocab-size", "280", "--out", str(tok)]) == 0
    res = train(tiny_config(corpus, tmp_path / "runs", **{"data.tokenizer": str(tok), "train.steps": 2}))
    assert sorted(res.losses) == [1, 2]
    assert from_pretrained(res.checkpoint).config.vocab_size == 280


def test_activation_checkpointing_same_losses(corpus, tmp_path):
    base = train(tiny_config(corpus, tmp_path / "a", **{"train.steps": 3}))
    ckpt = train(
        tiny_config(corpus, tmp_path / "b", **{"train.steps": 3, "train.activation_checkpointing": True})
    )
    for s in base.losses:
        assert ckpt.losses[s] == pytest.approx(base.losses[s], rel=1e-6)
    assert torch.isfinite(torch.tensor(list(ckpt.losses.values()))).all()


def test_token_cache_shared_and_rebuilt_when_data_changes(corpus, tmp_path):
    from mambakit.training.distributed import DistInfo
    from mambakit.training.token_cache import prepare_data
    from mambakit.training.tokenizer import ByteTokenizer

    cfg = tiny_config(corpus, tmp_path / "runs")
    train_rows, _ = prepare_data(cfg, ByteTokenizer(), DistInfo())
    caches = list((tmp_path / "runs" / ".token-cache").iterdir())
    assert len(caches) == 1 and not caches[0].name.startswith(".tmp")
    stamp = (caches[0] / "train.tokens").stat().st_mtime_ns
    again, _ = prepare_data(cfg, ByteTokenizer(), DistInfo())
    assert (caches[0] / "train.tokens").stat().st_mtime_ns == stamp and len(again.file) == len(
        train_rows.file
    )
    (corpus / "doc001.txt").write_text("a new first document, longer than before " * 5)
    changed, _ = prepare_data(cfg, ByteTokenizer(), DistInfo())
    assert len(list((tmp_path / "runs" / ".token-cache").iterdir())) == 2
    assert len(changed.file) != len(train_rows.file)
