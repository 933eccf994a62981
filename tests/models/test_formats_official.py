"""Official state-spaces format: hand-built official state dicts (config.json + pytorch_model.bin) load
into mambakit and compute what the official block layout computes (a reference forward written here:
mixer, then norm2 + gated MLP inside the block); saving writes the same files back; the pattern
mapping both ways and its refusals; corrupt, truncated and mismatched files."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mambakit.layers import Attention, Mamba1, Mamba2
from mambakit.models import LanguageModel, ModelConfig, from_pretrained
from mambakit.models.formats import detect_format, save_checkpoint
from mambakit.models.formats.official import config_from_official, config_to_official, official_blocks

D = 32


def _rand(*shape: int) -> torch.Tensor:
    return 0.2 * torch.randn(*shape)


def _norm(name: str) -> dict[str, torch.Tensor]:
    return {f"{name}.weight": 1 + 0.1 * torch.randn(D)}


def _mamba2_block(ssm: dict) -> dict[str, torch.Tensor]:
    d_inner, n, g, hd = 2 * D, ssm["d_state"], ssm["ngroups"], ssm["headdim"]
    h, conv_dim = d_inner // hd, d_inner + 2 * g * n
    return {
        "in_proj.weight": _rand(2 * d_inner + 2 * g * n + h, D),
        "conv1d.weight": _rand(conv_dim, 1, 4),
        "conv1d.bias": _rand(conv_dim),
        "dt_bias": _rand(h) - 2,
        "A_log": torch.rand(h).log1p(),
        "D": 1 + _rand(h),
        "norm.weight": 1 + _rand(d_inner),
        "out_proj.weight": _rand(D, d_inner),
    }


def _mamba1_block() -> dict[str, torch.Tensor]:
    d_inner, n, rank = 2 * D, 16, 2  # dt_rank "auto" = ceil(32 / 16)
    return {
        "in_proj.weight": _rand(2 * d_inner, D),
        "conv1d.weight": _rand(d_inner, 1, 4),
        "conv1d.bias": _rand(d_inner),
        "x_proj.weight": _rand(rank + 2 * n, d_inner),
        "dt_proj.weight": _rand(d_inner, rank),
        "dt_proj.bias": _rand(d_inner) - 2,
        "A_log": torch.arange(1, n + 1).float().log().repeat(d_inner, 1) + 0.1 * torch.randn(d_inner, n),
        "D": 1 + _rand(d_inner),
        "out_proj.weight": _rand(D, d_inner),
    }


def _attn_block(heads: int, kv_heads: int) -> dict[str, torch.Tensor]:
    hd = D // heads
    return {  # mamba_ssm's MHA: q | k | v in one projection, biases on by default
        "in_proj.weight": _rand((heads + 2 * kv_heads) * hd, D),
        "in_proj.bias": _rand((heads + 2 * kv_heads) * hd),
        "out_proj.weight": _rand(D, heads * hd),
        "out_proj.bias": _rand(D),
    }


def _write(directory, config: dict, sd: dict[str, torch.Tensor]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    torch.save(sd, directory / "pytorch_model.bin")


HYBRID_SSM = {"layer": "Mamba2", "d_state": 8, "headdim": 16, "ngroups": 2, "chunk_size": 4}
HYBRID = {
    "d_model": D, "d_intermediate": 100, "n_layer": 3, "vocab_size": 50, "ssm_cfg": HYBRID_SSM,
    "attn_layer_idx": [1], "attn_cfg": {"num_heads": 4, "num_heads_kv": 2, "causal": True},
    "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8,
    "tie_embeddings": False,
}  # fmt: skip
MLP_WIDTH = 128  # mamba_ssm's GatedMLP rounds d_intermediate=100 up to a multiple of 128


def _hybrid_state_dict() -> dict[str, torch.Tensor]:
    """By hand, in the official names: 3 blocks (Mamba2, attention, Mamba2), each with norm2 + gated MLP."""
    torch.manual_seed(0)
    sd = {"backbone.embedding.weight": _rand(56, D), "lm_head.weight": _rand(56, D)}
    for i in range(3):
        mixer = _attn_block(4, 2) if i == 1 else _mamba2_block(HYBRID_SSM)
        sd.update({f"backbone.layers.{i}.mixer.{k}": v for k, v in mixer.items()})
        sd.update({f"backbone.layers.{i}.{k}": v for k, v in _norm("norm").items()})
        sd.update({f"backbone.layers.{i}.{k}": v for k, v in _norm("norm2").items()})
        sd[f"backbone.layers.{i}.mlp.fc1.weight"] = _rand(2 * MLP_WIDTH, D)
        sd[f"backbone.layers.{i}.mlp.fc2.weight"] = _rand(D, MLP_WIDTH)
    sd.update({f"backbone.{k}": v for k, v in _norm("norm_f").items()})
    return sd


def _rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w


def _sub(sd: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


@torch.no_grad()
def _official_forward(config: dict, sd: dict, ids: torch.Tensor) -> torch.Tensor:
    """The official MambaLMHeadModel forward, written here from its block layout: residual += hidden;
    hidden = mixer(norm(residual)); with an MLP: residual += hidden; hidden = mlp(norm2(residual))."""
    ssm = dict(config.get("ssm_cfg", {}))
    version = 2 if ssm.pop("layer", "Mamba1") == "Mamba2" else 1
    hidden, residual = F.embedding(ids, sd["backbone.embedding.weight"]), None
    for i in range(config["n_layer"]):
        p = f"backbone.layers.{i}."
        if i in config.get("attn_layer_idx", []):
            a = config["attn_cfg"]
            mixer = Attention(D, a["num_heads"], a.get("num_heads_kv"), qkv_bias=True, out_bias=True)
        elif version == 2:
            mixer = Mamba2(D, **ssm)
        else:
            mixer = Mamba1(D, **ssm)
        mixer.load_state_dict(_sub(sd, p + "mixer."))
        residual = hidden if residual is None else residual + hidden
        hidden = mixer(_rms(residual, sd[p + "norm.weight"]))
        if config.get("d_intermediate", 0) > 0:
            residual = residual + hidden
            y, gate = F.linear(_rms(residual, sd[p + "norm2.weight"]), sd[p + "mlp.fc1.weight"]).chunk(2, -1)
            hidden = F.linear(y * F.silu(gate), sd[p + "mlp.fc2.weight"])
    out = _rms(residual + hidden, sd["backbone.norm_f.weight"])
    return F.linear(out, sd["lm_head.weight"])[..., : config["vocab_size"]]


def _assert_logits_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape and torch.isfinite(ours).all()
    err, scale = (ours - ref).abs().max(), ref.abs().max()
    assert err <= 1e-4 * scale, f"max |diff| {err:.3g} vs logit scale {scale:.3g}"


@torch.no_grad()
def _greedy(model: LanguageModel, prompt: torch.Tensor, n: int) -> torch.Tensor:
    cache = model.allocate_inference_cache(prompt.shape[0], prompt.shape[1] + n)
    token = model(prompt, cache=cache)[:, -1].argmax(-1, keepdim=True)
    out = [token]
    for _ in range(n - 1):
        token = model.step(token, cache)[:, -1].argmax(-1, keepdim=True)
        out.append(token)
    return torch.cat(out, dim=1)


@torch.no_grad()
def test_hand_built_hybrid_loads_computes_the_official_layout_and_round_trips(tmp_path):
    sd = _hybrid_state_dict()
    _write(tmp_path / "src", HYBRID, sd)
    assert detect_format(tmp_path / "src") == "official"
    model = from_pretrained(tmp_path / "src").eval()
    assert model.config.pattern == "M-*-M-"
    assert model.config.mlp.d_intermediate == MLP_WIDTH and model.config.padded_vocab_size == 56

    torch.manual_seed(1)
    ids = torch.randint(0, 50, (2, 11))
    _assert_logits_close(model(ids), _official_forward(HYBRID, sd, ids))
    # greedy decoding with the cache equals greedy argmax of the reference over the growing sequence
    seq = ids
    for _ in range(6):
        seq = torch.cat([seq, _official_forward(HYBRID, sd, seq)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(_greedy(model, ids, 6), seq[:, ids.shape[1] :])

    # saving writes the same official files back
    save_checkpoint(model, tmp_path / "out", format="official")
    again = torch.load(tmp_path / "out" / "pytorch_model.bin", weights_only=True)
    assert set(again) == set(sd)
    for k, v in sd.items():
        assert torch.equal(again[k], v), k
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["attn_layer_idx"] == [1] and written["d_intermediate"] == MLP_WIDTH
    assert config_to_official(config_from_official(written)) == written == config_to_official(model.config)


MAMBA1_OLD_STYLE = {  # the first published configs: no d_intermediate, attention or tie keys
    "d_model": D, "n_layer": 2, "vocab_size": 45, "ssm_cfg": {}, "rms_norm": True,
    "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8,
}  # fmt: skip


@torch.no_grad()
def test_hand_built_mamba1_with_tied_head_loads(tmp_path):
    torch.manual_seed(2)
    emb = _rand(48, D)
    sd = {"backbone.embedding.weight": emb, "lm_head.weight": emb}  # mamba_ssm saves both
    for i in range(2):
        sd.update({f"backbone.layers.{i}.mixer.{k}": v for k, v in _mamba1_block().items()})
        sd.update({f"backbone.layers.{i}.{k}": v for k, v in _norm("norm").items()})
    sd.update({f"backbone.{k}": v for k, v in _norm("norm_f").items()})
    _write(tmp_path, MAMBA1_OLD_STYLE, sd)
    model = from_pretrained(tmp_path).eval()
    assert model.config.ssm.version == 1 and model.config.tie_embeddings and model.config.pattern == "MM"
    ids = torch.randint(0, 45, (2, 9))
    _assert_logits_close(model(ids), _official_forward(MAMBA1_OLD_STYLE, sd, ids))
    # a tied head that is not the embedding is a broken file, not a choice to make silently
    _write(tmp_path / "bad", MAMBA1_OLD_STYLE, {**sd, "lm_head.weight": emb + 1})
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*lm_head\.weight differs"):
        from_pretrained(tmp_path / "bad")
    # dtype on load
    assert from_pretrained(tmp_path, dtype=torch.bfloat16).backbone.norm_f.weight.dtype == torch.bfloat16


def _config(pattern: str, **kw) -> ModelConfig:
    base = dict(
        d_model=D, vocab_size=50, pattern=pattern, ssm={"d_state": 8, "headdim": 16},
        attn={"num_heads": 4}, mlp={"d_intermediate": 128},
    )  # fmt: skip
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize(
    "pattern, n_layer, attn_idx, d_intermediate",
    [("MM*M", 4, [2], 0), ("M-*-M-", 3, [1], 128), ("*-", 1, [0], 128), ("M", 1, [], 0)],
)
def test_expressible_patterns_map_both_ways(pattern, n_layer, attn_idx, d_intermediate):
    official = config_to_official(_config(pattern))
    assert official["n_layer"] == n_layer and official["attn_layer_idx"] == attn_idx
    assert official["d_intermediate"] == d_intermediate
    assert len(official_blocks(pattern)) == n_layer
    back = config_from_official(json.loads(json.dumps(official)))
    assert back.pattern == pattern
    assert config_to_official(back) == official


@pytest.mark.parametrize(
    "pattern, match",
    [("-M", "position 0"), ("M--", "position 2"), ("M-M", "some mixers only"), ("M-*", "some mixers only")],
)
def test_patterns_the_official_layout_cannot_express(pattern, match):
    with pytest.raises(ValueError, match=match):
        config_to_official(_config(pattern))


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"mlp": {"d_intermediate": 100}}, "multiple of 128"),
        ({"mlp": {"d_intermediate": 128, "activation": "relu2"}}, "swiglu"),
        ({"norm_eps": 1e-6}, "norm_eps"),
    ],
)
def test_settings_the_official_model_cannot_express(kw, match):
    with pytest.raises(ValueError, match=match):
        config_to_official(_config("M-", **kw))
    with pytest.raises(ValueError, match=match):  # nothing is written either
        save_checkpoint(LanguageModel(_config("M-", **kw)), "/nonexistent/never", format="official")


@pytest.mark.parametrize(
    "change, match",
    [
        ({"rms_norm": False}, "rms_norm"),
        ({"surprise": 1}, "surprise"),
        ({"ssm_cfg": {"layer": "Mamba3"}}, "Mamba3"),
        ({"ssm_cfg": {"layer": "Mamba2", "d_ssm": 16}}, "d_ssm"),
        ({"ssm_cfg": {"layer": "Mamba1", "headdim": 16}}, "headdim"),
        ({"attn_layer_idx": [0], "attn_cfg": {"num_heads": 4}}, "causal"),
        ({"attn_layer_idx": [0], "attn_cfg": {"num_heads": 4, "causal": True, "mlp_dim": 64}}, "mlp_dim"),
        ({"attn_layer_idx": [5]}, "attn_layer_idx"),
        ({"attn_layer_idx": [0], "attn_cfg": {"causal": True}}, "num_heads"),
        ({"d_model": 0}, "d_model"),
    ],
)
def test_unsupported_official_configs_are_refused(tmp_path, change, match):
    config = {**MAMBA1_OLD_STYLE, **change}
    _write(tmp_path, config, {})
    with pytest.raises(ValueError, match=match) as e:
        from_pretrained(tmp_path)
    assert "config.json" in str(e.value)


def _saved_hybrid(tmp_path):
    sd = _hybrid_state_dict()
    _write(tmp_path, HYBRID, sd)
    return sd, tmp_path / "pytorch_model.bin"


def test_mismatched_files_name_the_file_and_the_keys(tmp_path):
    sd, path = _saved_hybrid(tmp_path)
    broken = dict(sd)
    del broken["backbone.layers.2.norm2.weight"]
    broken["backbone.layers.3.mixer.A_log"] = torch.zeros(4)
    torch.save(broken, path)
    with pytest.raises(ValueError) as e:
        from_pretrained(tmp_path)
    msg = str(e.value)
    assert "pytorch_model.bin" in msg
    assert "missing keys ['backbone.layers.2.norm2.weight']" in msg
    assert "unexpected keys ['backbone.layers.3.mixer.A_log']" in msg

    broken = dict(sd)
    broken["backbone.layers.1.mlp.fc2.weight"] = torch.zeros(D, 100)
    torch.save(broken, path)
    with pytest.raises(
        ValueError, match=r"pytorch_model\.bin.*mlp\.fc2\.weight: expected \(32, 128\), found \(32, 100\)"
    ):
        from_pretrained(tmp_path)


def test_corrupt_truncated_and_unsafe_files_are_refused(tmp_path):
    sd, path = _saved_hybrid(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="pytorch_model.bin"):
        from_pretrained(tmp_path)
    path.write_bytes(b"not a pickle at all" * 10)
    with pytest.raises(ValueError, match="pytorch_model.bin"):
        from_pretrained(tmp_path)
    # weights_only=True: a pickle that would build an arbitrary object is refused, not executed
    torch.save({**sd, "extra": _Unsafe()}, path)
    with pytest.raises(ValueError, match="pytorch_model.bin"):
        from_pretrained(tmp_path)
    path.unlink()
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(ValueError, match="config.json"):
        from_pretrained(tmp_path)


class _Unsafe:
    """Any class outside torch's weights-only allow list."""
