"""Training config: defaults < TOML < flags, type and key errors, resolved config written and re-read."""

from __future__ import annotations

import math

import pytest

from mambakit.training.config import DEFAULT_MODEL, dump_toml, load_config, parse_value, read_toml


def test_parse_value():
    assert parse_value("8") == 8
    assert parse_value("3e-4") == 3e-4
    assert parse_value("true") is True
    assert parse_value("[0.0, inf]") == [0.0, math.inf]
    assert parse_value("tiny-mamba2") == "tiny-mamba2"
    assert parse_value('"007"') == "007"


def test_toml_then_flags(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        '[train]\nsteps = 50\nbatch_size = 4\n[optim]\nlr = 1e-3\n[model]\npreset = "hybrid-tiny"\n'
        "d_model = 32\n[model.ssm]\nd_state = 8\n"
    )
    cfg = load_config(
        path, [("train.steps", "7"), ("optim.warmup_steps", "2"), ("model.attn.num_heads", "2")]
    )
    assert cfg.train.steps == 7 and cfg.train.batch_size == 4 and cfg.optim.lr == 1e-3
    assert cfg.optim.warmup_steps == 2 and cfg.optim.beta2 == 0.95
    assert cfg.model == {
        "preset": "hybrid-tiny",
        "d_model": 32,
        "ssm": {"d_state": 8},
        "attn": {"num_heads": 2},
    }
    # without a preset, model keys refine the default model
    cfg = load_config(None, {"model.d_model": 64})
    assert cfg.model["preset"] == DEFAULT_MODEL["preset"] and cfg.model["d_model"] == 64
    assert cfg.model["ssm"] == DEFAULT_MODEL["ssm"]
    assert load_config().optim.lr == 3e-3  # floats read from ints too:
    assert load_config(None, {"optim.lr": 1}).optim.lr == 1.0


def test_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="stepz"):
        load_config(None, {"train.stepz": 3})
    with pytest.raises(TypeError, match="train.steps"):
        load_config(None, {"train.steps": "many"})
    with pytest.raises(TypeError, match="train.compile"):
        load_config(None, {"train.compile": 1})
    with pytest.raises(ValueError, match="distributed.strategy"):
        load_config(None, {"distributed.strategy": "zero3"})
    with pytest.raises(ValueError, match="sections"):
        load_config(None, {"trian.steps": 3})
    with pytest.raises(ValueError, match="SECTION.FIELD"):
        load_config(None, {"steps": 3})
    (tmp_path / "bad.toml").write_text("[train\n")
    with pytest.raises(ValueError, match="bad.toml"):
        load_config(tmp_path / "bad.toml")
    with pytest.raises(FileNotFoundError, match="nope.toml"):
        load_config(tmp_path / "nope.toml")


def test_dump_toml_round_trip(tmp_path):
    cfg = load_config(
        None, {"train.name": "x", "data.val_fraction": 0.0, "model.ssm.dt_limit": [0.0, math.inf]}
    )
    text = dump_toml(cfg.to_dict())
    (tmp_path / "r.toml").write_text(text)
    assert read_toml(tmp_path / "r.toml")["model"]["ssm"]["dt_limit"] == [0.0, math.inf]
    again = load_config(tmp_path / "r.toml")
    assert again == cfg


def test_choice_keys_take_toml_booleans():
    """`optim.fused = true` / `train.cuda_graph = false` (TOML booleans, or --set parsed as TOML) are the
    choices "true" / "false"; other values still fail."""
    cfg = load_config(None, {"optim.fused": parse_value("true"), "train.cuda_graph": parse_value("false")})
    assert cfg.optim.fused == "true" and cfg.train.cuda_graph == "false"
    assert load_config().train.cuda_graph == "auto"
    with pytest.raises(ValueError, match="train.cuda_graph must be one of"):
        load_config(None, {"train.cuda_graph": "sometimes"})
