"""ModelConfig: defaults, validation messages that name the field, dict and config.json round trips."""

from __future__ import annotations

import json
import math

import pytest

from mambakit.models import AttentionConfig, MLPConfig, ModelConfig, SSMConfig


def hybrid() -> ModelConfig:
    return ModelConfig(
        d_model=64,
        vocab_size=1000,
        pattern="M-*-M-",
        ssm=SSMConfig(version=2, d_state=16, headdim=16, ngroups=2, dt_limit=(0.0, math.inf)),
        attn=AttentionConfig(num_heads=4, num_kv_heads=2, rotary_emb_dim=8),
        mlp=MLPConfig(activation="relu2"),
        tie_embeddings=False,
    )


def test_defaults_and_derived_fields():
    c = hybrid()
    assert c.n_layer == 6 and c.padded_vocab_size == 1008
    assert c.mlp.d_intermediate == 256
    assert ModelConfig(8, 10, "M", ssm=SSMConfig(version=1)).ssm.d_state == 16
    assert ModelConfig(8, 10, "M", ssm=SSMConfig(version=2, headdim=8)).ssm.d_state == 128
    assert ModelConfig(64, 16, "M").padded_vocab_size == 16


def test_dict_round_trip():
    c = hybrid()
    d = c.to_dict()
    assert d["ssm"]["dt_limit"] == [0.0, "inf"]  # JSON has no infinity
    assert ModelConfig.from_dict(json.loads(json.dumps(d))) == c
    assert ModelConfig.from_dict(d).ssm.dt_limit == (0.0, math.inf)


def test_save_load_round_trip(tmp_path):
    c = hybrid()
    path = c.save(tmp_path / "ckpt")
    assert path.name == "config.json"

    def no_constants(name):
        raise AssertionError(f"config.json holds the non-JSON constant {name}")

    json.loads(path.read_text(), parse_constant=no_constants)
    assert ModelConfig.load(tmp_path / "ckpt") == c
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["config.json"]  # no temporary files left


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        ModelConfig.load(tmp_path)


def test_unknown_keys_are_named():
    d = hybrid().to_dict()
    d["n_layers"] = 3
    with pytest.raises(ValueError, match="n_layers"):
        ModelConfig.from_dict(d)
    d = hybrid().to_dict()
    d["ssm"]["dstate"] = 3
    with pytest.raises(ValueError, match="dstate"):
        ModelConfig.from_dict(d)


@pytest.mark.parametrize("pattern, bad, pos", [("MMxM", "'x'", 2), ("m", "'m'", 0), ("M-* ", "' '", 3)])
def test_unknown_pattern_character(pattern, bad, pos):
    with pytest.raises(ValueError, match="pattern") as err:
        ModelConfig(64, 100, pattern)
    assert bad in str(err.value) and f"position {pos}" in str(err.value)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(d_model=0), "d_model"),
        (dict(vocab_size=-1), "vocab_size"),
        (dict(pattern=""), "pattern"),
        (dict(pad_vocab_size_multiple=0), "pad_vocab_size_multiple"),
        (dict(norm_eps=0.0), "norm_eps"),
        (dict(ssm=SSMConfig(headdim=48)), "headdim"),
        (dict(ssm=SSMConfig(headdim=16, ngroups=3)), "ngroups"),
        (dict(attn=AttentionConfig()), "num_heads"),
        (dict(attn=AttentionConfig(num_heads=4, num_kv_heads=3)), "num_kv_heads"),
        (dict(attn=AttentionConfig(num_heads=5)), "num_heads"),
        (dict(attn=AttentionConfig(num_heads=4, rotary_emb_dim=3)), "rotary_emb_dim"),
    ],
)
def test_model_validation_names_the_field(kwargs, match):
    base = dict(d_model=64, vocab_size=100, pattern="M*-", attn=AttentionConfig(num_heads=4))
    with pytest.raises(ValueError, match=match):
        ModelConfig(**{**base, **kwargs})


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: SSMConfig(version=3), "version"),
        (lambda: SSMConfig(d_state=0), "d_state"),
        (lambda: SSMConfig(dt_rank=0), "dt_rank"),
        (lambda: SSMConfig(dt_min=0.2, dt_max=0.1), "dt_min"),
        (lambda: SSMConfig(dt_limit=(0.1, 0.1)), "dt_limit"),
        (lambda: SSMConfig(A_init_range=(0.0, 1.0)), "A_init_range"),
        (lambda: MLPConfig(activation="gelu"), "activation"),
        (lambda: MLPConfig(d_intermediate=0), "d_intermediate"),
    ],
)
def test_part_validation_names_the_field(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_attention_needs_heads_only_when_used():
    ModelConfig(64, 100, "M-")  # no '*': attention settings are not needed
    with pytest.raises(ValueError, match="num_heads"):
        ModelConfig(64, 100, "M*")
