"""Task training: a second or two of training per task runs, lowers the answer loss, and evaluates; the
CLI writes its table and results.json."""

from __future__ import annotations

import json

import pytest
import torch

from mambakit.cli import main
from mambakit.tasks.induction_heads import InductionHeads
from mambakit.tasks.models import build_task_model
from mambakit.tasks.mqar import MQAR
from mambakit.tasks.phonebook import Phonebook
from mambakit.tasks.selective_copying import SelectiveCopying
from mambakit.tasks.train import TrainSettings, evaluate, train

SMOKE = [
    (SelectiveCopying(seqlen=16, num_tokens=4, vocab_size=8), "mamba1"),
    (SelectiveCopying(seqlen=16, num_tokens=4, vocab_size=8), "lti"),
    (InductionHeads(seqlen=24, vocab_size=8), "mamba2"),
    (MQAR(seqlen=32, num_kv_pairs=4, vocab_size=32), "hybrid"),
    (Phonebook(num_entries=4, name_len=1, number_len=2, vocab_size=24), "attention"),
]


@pytest.mark.parametrize("task, name", SMOKE, ids=lambda v: v if isinstance(v, str) else type(v).__name__)
def test_a_short_training_lowers_the_loss(task, name):
    torch.manual_seed(0)
    model = build_task_model(name, task.vocab_size, d_model=16, n_layers=2)
    result = train(model, task.sample, TrainSettings(steps=25, batch_size=16, lr=1e-2, warmup_steps=2))
    assert len(result.losses) == 25
    # the answers' marginal distribution alone takes the loss below its start
    assert sum(result.losses[-5:]) / 5 < sum(result.losses[:5]) / 5 - 0.05, result.losses
    acc = evaluate(model, task.sample, num_examples=20, batch_size=8)
    assert 0.0 <= acc <= 1.0


def test_bad_train_settings_are_named():
    with pytest.raises(ValueError, match="steps"):
        TrainSettings(steps=0)
    with pytest.raises(ValueError, match="lr"):
        TrainSettings(lr=0.0)
    with pytest.raises(ValueError, match="weight_decay"):
        TrainSettings(weight_decay=-0.1)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        TrainSettings(min_lr_ratio=1.5)


def test_cli_writes_results(tmp_path, capsys):
    out = tmp_path / "ih"
    argv = ["task", "induction-heads", "--cpu", "--models", "mamba2,attention", "--steps", "2"]
    argv += ["--batch-size", "4", "--d-model", "16", "--eval-lengths", "16,48", "--eval-examples", "8"]
    argv += ["--weight-decay", "0", "--min-lr-ratio", "1"]
    assert main(argv + ["--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["training"]["weight_decay"] == 0 and results["training"]["min_lr_ratio"] == 1
    assert set(results["models"]) == {"mamba2", "attention"}
    assert set(results["models"]["mamba2"]["accuracy_by_length"]) == {"16", "48"}
    assert (out / "induction_heads.png").exists()
    assert "| mamba2 |" in capsys.readouterr().out


def test_cli_bad_arguments_are_named(tmp_path):
    with pytest.raises(SystemExit, match="--models"):
        main(["task", "mqar", "--cpu", "--models", "mamba3", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--num-kv-pairs"):
        main(["task", "selective-copying", "--cpu", "--num-kv-pairs", "4", "--out", str(tmp_path)])
