"""Training checkpoints: round trip, a crash mid-write leaves the previous one loadable, keep-last-k."""

from __future__ import annotations

import pytest
import torch

from mambakit.models import LanguageModel, from_pretrained, preset
from mambakit.training import checkpoint as ck


def _model():
    return LanguageModel(preset("tiny-mamba2", d_model=32, pattern="M", ssm={"headdim": 16}))


def _save(run, step, model, keep=3, extra=None):
    state = {"optimizer": {"x": torch.tensor([step])}, "rng": ck.rng_state(), **(extra or {})}
    return ck.save_checkpoint(run, step, model.state_dict(), model.config, state, keep)


def test_round_trip_and_model_directory(tmp_path):
    model = _model()
    path = _save(tmp_path, 5, model)
    assert path == tmp_path / "checkpoints" / "step_00000005"
    state, trainer = ck.load_checkpoint(path)
    assert trainer["step"] == 5 and trainer["optimizer"]["x"].item() == 5
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v), k
    again = from_pretrained(path)  # a checkpoint is also a model directory
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)
    torch.manual_seed(123)
    a = torch.rand(3)
    ck.set_rng_state(trainer["rng"])
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), a)


def test_crash_during_write_keeps_previous(tmp_path, monkeypatch):
    model = _model()
    _save(tmp_path, 1, model)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ck.torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path, 2, model)
    monkeypatch.undo()
    assert ck.latest_checkpoint(tmp_path).name == "step_00000001"
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000001"]
    state, trainer = ck.load_checkpoint(ck.latest_checkpoint(tmp_path))
    assert trainer["step"] == 1
    # a process killed mid-write leaves a temporary directory: never listed, removed by the next save
    (tmp_path / "checkpoints" / ".tmp-step_00000003-999").mkdir()
    assert ck.latest_checkpoint(tmp_path).name == "step_00000001"
    _save(tmp_path, 4, model)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001", "step_00000004"]


def test_keep_last_k_and_same_step_again(tmp_path):
    model = _model()
    for step in (1, 2, 3, 10, 20):
        _save(tmp_path, step, model, keep=2)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_00000010", "step_00000020"]
    _save(tmp_path, 20, model, keep=2, extra={"note": "again"})
    assert ck.load_checkpoint(ck.latest_checkpoint(tmp_path))[1]["note"] == "again"
    assert ck.latest_checkpoint(ck.latest_checkpoint(tmp_path)).name == "step_00000020"
    with pytest.raises(ValueError, match="keep_last"):
        _save(tmp_path, 21, model, keep=0)
    with pytest.raises(FileNotFoundError, match="trainer_state"):
        ck.load_checkpoint(tmp_path)
