"""Presets: documented shapes, parameter counts (counted on the meta device), hybrid layer patterns."""

from __future__ import annotations

import pytest
import torch

from mambakit.models import PRESETS, LanguageModel, hybrid_pattern, preset

# (name, d_model, n_layer, ssm version, parameters low, high); the official checkpoints have
# 129.1M, 371.5M, 793.2M, 1.37B, 2.77B (Mamba-1) and 130M ... 2.7B (Mamba-2) parameters
SHAPES = [
    ("mamba1-130m", 768, 24, 1, 125e6, 135e6),
    ("mamba1-370m", 1024, 48, 1, 360e6, 380e6),
    ("mamba1-790m", 1536, 48, 1, 780e6, 800e6),
    ("mamba1-1.4b", 2048, 48, 1, 1.35e9, 1.45e9),
    ("mamba1-2.8b", 2560, 64, 1, 2.7e9, 2.85e9),
    ("mamba2-130m", 768, 24, 2, 125e6, 135e6),
    ("mamba2-370m", 1024, 48, 2, 360e6, 380e6),
    ("mamba2-780m", 1536, 48, 2, 770e6, 790e6),
    ("mamba2-1.3b", 2048, 48, 2, 1.3e9, 1.4e9),
    ("mamba2-2.7b", 2560, 64, 2, 2.65e9, 2.75e9),
]


def count_on_meta(name: str) -> int:
    with torch.device("meta"):
        return LanguageModel(preset(name)).num_parameters()


@pytest.mark.parametrize("name, d_model, n_layer, version, low, high", SHAPES)
def test_mamba_presets(name, d_model, n_layer, version, low, high):
    c = preset(name)
    assert (c.d_model, c.n_layer, c.ssm.version, c.pattern) == (d_model, n_layer, version, "M" * n_layer)
    assert c.vocab_size == 50277 and c.padded_vocab_size == 50288 and c.tie_embeddings
    assert c.ssm.d_state == (16 if version == 1 else 128)
    assert low <= count_on_meta(name) <= high


def test_hybrid_8b():
    c = preset("hybrid-8b")
    p = c.pattern
    assert (len(p), p.count("M"), p.count("*"), p.count("-"), p[0]) == (56, 24, 4, 28, "M")
    assert (c.d_model, c.attn.num_heads, c.attn.num_kv_heads, c.attn.head_dim) == (4096, 32, 8, 128)
    assert (c.mlp.d_intermediate, c.mlp.activation, c.attn.rotary_emb_dim) == (16384, "relu2", 0)
    assert c.ssm.version == 2 and not c.tie_embeddings
    assert 8.0e9 <= count_on_meta("hybrid-8b") <= 9.0e9
    mixers = p.replace("-", "")
    attn_at = [k for k, ch in enumerate(mixers) if ch == "*"]
    spacing = [b - a for a, b in zip(attn_at, attn_at[1:])]
    assert len(attn_at) == 4 and max(spacing) - min(spacing) <= 1  # evenly spread among the mixers
    assert all(p[i + 1] == "-" for i, ch in enumerate(p) if ch != "-")  # an MLP after every mixer


def test_small_presets_build_and_run():
    for name in ("hybrid-tiny", "tiny-mamba1", "tiny-mamba2", "hybrid-130m"):
        c = preset(name)
        assert c.pattern[0] == "M"
        if name.startswith("hybrid"):
            assert 0 < c.pattern.count("*") <= max(1, round(0.1 * c.n_layer))
    c = preset("hybrid-130m")
    assert c.n_layer == 24 and c.d_model == 768
    for name in ("hybrid-130m", "hybrid-8b"):  # the hybrid paper's share: 4 of 56 layers (7%)
        share = preset(name).pattern.count("*") / preset(name).n_layer
        assert 0.05 <= share <= 0.1, (name, share)
    assert 120e6 <= count_on_meta("hybrid-130m") <= 150e6


def test_every_preset_is_listed_and_valid():
    assert {"hybrid-tiny", "hybrid-130m", "hybrid-8b", "tiny-mamba1", "tiny-mamba2"} <= set(PRESETS)
    for name in PRESETS:
        assert preset(name) == preset(name)  # fresh, deterministic
        assert preset(name) is not preset(name)


def test_overrides():
    c = preset("tiny-mamba2", d_model=32, ssm={"d_state": 8, "chunk_size": 8})
    assert (c.d_model, c.ssm.d_state, c.ssm.chunk_size, c.ssm.headdim) == (32, 8, 8, 16)
    assert c.mlp.d_intermediate == 128  # follows the new d_model
    assert preset("tiny-mamba2", ssm={"version": 1}).ssm.d_state == 16
    assert preset("mamba2-130m", pattern="M" * 4).n_layer == 4
    with pytest.raises(ValueError, match="n_layers"):
        preset("tiny-mamba2", n_layers=3)
    with pytest.raises(ValueError, match="known presets"):
        preset("mamba3-130m")
    with pytest.raises(ValueError, match="headdim"):
        preset("tiny-mamba2", ssm={"headdim": 48})


@pytest.mark.parametrize(
    "n_ssm, n_attn, n_mlp", [(3, 1, 4), (24, 4, 28), (5, 0, 0), (4, 4, 8), (7, 2, 3), (1, 0, 5)]
)
def test_hybrid_pattern_counts(n_ssm, n_attn, n_mlp):
    p = hybrid_pattern(n_ssm, n_attn, n_mlp)
    assert (p.count("M"), p.count("*"), p.count("-")) == (n_ssm, n_attn, n_mlp)
    assert p[0] == "M"
    if n_mlp == n_ssm + n_attn:  # one MLP after every mixer
        assert p == "".join(ch + "-" for ch in p[::2])


def test_hybrid_pattern_examples_and_errors():
    assert hybrid_pattern(3, 1, 4) == "M-M-*-M-"
    assert hybrid_pattern(2, 0, 0) == "MM"
    with pytest.raises(ValueError, match="n_ssm"):
        hybrid_pattern(0, 1, 1)
    with pytest.raises(ValueError, match="n_mlp"):
        hybrid_pattern(2, 1, -1)
