"""HF transformers format: tiny random MambaForCausalLM / Mamba2ForCausalLM saved by transformers load
into mambakit with the same logits and greedy tokens; mambakit saves HF checkpoints that transformers
loads; sharded checkpoints; the gated norm and Mamba-1 projection layouts; bad files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mambakit.layers.norm import GatedRMSNorm
from mambakit.models import LanguageModel, ModelConfig, from_pretrained
from mambakit.models.formats import detect_format, save_checkpoint
from mambakit.models.formats.hf import config_to_hf

transformers = pytest.importorskip("transformers")

VOCAB = 100  # not a multiple of 16: mambakit pads the embedding, HF does not
NEW_TOKENS = 10


def _hf_model(version: int, seed: int, **overrides) -> torch.nn.Module:
    """A tiny random HF model; every parameter gets noise so that no bias or norm weight stays at its
    init value (a zero bias would hide a mapping error)."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB, hidden_size=64, state_size=16, num_hidden_layers=2,
        eos_token_id=None, bos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    common.update(overrides)
    if version == 1:
        model = transformers.MambaForCausalLM(transformers.MambaConfig(**common))
    else:
        common.setdefault("num_heads", 8)
        common.setdefault("head_dim", 16)
        model = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**common))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@torch.no_grad()
def _greedy(model: LanguageModel, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """mambakit greedy decoding: one chunked prefill, then n - 1 single-token steps."""
    cache = model.allocate_inference_cache(prompt.shape[0], prompt.shape[1] + n)
    token = model(prompt, cache=cache)[:, -1].argmax(-1, keepdim=True)
    out = [token]
    for _ in range(n - 1):
        token = model.step(token, cache)[:, -1].argmax(-1, keepdim=True)
        out.append(token)
    return torch.cat(out, dim=1)


def _assert_logits_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape
    assert torch.isfinite(ours).all() and torch.isfinite(theirs).all()
    scale = theirs.abs().max()
    assert scale > 0
    err = (ours - theirs).abs().max()
    assert err <= 1e-4 * scale, f"max |diff| {err:.3g} vs logit scale {scale:.3g}"


@pytest.mark.parametrize(
    "version, overrides",
    [
        (1, {"use_bias": True}),  # tied head (MambaConfig's default), projection biases
        (2, {"n_groups": 1, "chunk_size": 4}),
        (2, {"n_groups": 2, "chunk_size": 4, "use_bias": True, "tie_word_embeddings": True}),
    ],
)
@torch.no_grad()
def test_hf_checkpoint_gives_same_logits_and_greedy_tokens(tmp_path, version, overrides):
    hf = _hf_model(version, seed=version, **overrides)
    hf.save_pretrained(tmp_path)
    assert detect_format(tmp_path) == "hf"
    model = from_pretrained(tmp_path).eval()
    assert model.config.ssm.version == version and model.config.vocab_size == VOCAB
    assert model.config.padded_vocab_size > VOCAB
    assert model.config.tie_embeddings == hf.config.tie_word_embeddings
    # the padding rows are zeros; they never reach the logits
    assert not model.backbone.embedding.weight[VOCAB:].any()

    prompt = torch.randint(0, VOCAB, (2, 13))  # 13: several Mamba-2 chunks of 4 and a partial one
    _assert_logits_close(model(prompt), hf(prompt).logits)

    theirs = hf.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)[:, prompt.shape[1] :]
    assert theirs.shape == (2, NEW_TOKENS)
    assert torch.equal(_greedy(model, prompt, NEW_TOKENS), theirs)


def _mambakit_model(version: int, tie: bool) -> LanguageModel:
    torch.manual_seed(10 + version)
    ssm = {"version": version, "d_state": 16}
    if version == 2:
        ssm.update(headdim=16, ngroups=2, chunk_size=8)
    config = ModelConfig(d_model=64, vocab_size=VOCAB, pattern="MM", ssm=ssm, tie_embeddings=tie)
    model = LanguageModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("version, tie", [(1, False), (2, True)])
@torch.no_grad()
def test_mambakit_saves_hf_checkpoints_that_transformers_loads(tmp_path, version, tie):
    model = _mambakit_model(version, tie)
    save_checkpoint(model, tmp_path, format="hf")
    tensors = load_file(tmp_path / "model.safetensors")
    assert tensors["backbone.embeddings.weight"].shape == (VOCAB, 64)  # trimmed to vocab_size
    assert ("lm_head.weight" in tensors) == (not tie)
    cls = transformers.MambaForCausalLM if version == 1 else transformers.Mamba2ForCausalLM
    hf = cls.from_pretrained(tmp_path).eval()
    prompt = torch.randint(0, VOCAB, (2, 11))
    _assert_logits_close(hf(prompt).logits, model(prompt))
    # and back: the same numbers, except the vocabulary padding rows (dropped on save, zeros on load)
    again = from_pretrained(tmp_path).state_dict()
    for k, v in model.state_dict().items():
        if k in ("backbone.embedding.weight", "lm_head.weight"):
            assert not again[k][VOCAB:].any()
            v, again[k] = v[:VOCAB], again[k][:VOCAB]
        assert torch.equal(again[k], v), k


@torch.no_grad()
def test_sharded_checkpoints_load_both_ways(tmp_path):
    hf = _hf_model(2, seed=5, n_groups=2, chunk_size=4)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "hf").glob("model-*-of-*.safetensors"))) > 1
    model = from_pretrained(tmp_path / "hf").eval()
    prompt = torch.randint(0, VOCAB, (1, 9))
    _assert_logits_close(model(prompt), hf(prompt).logits)

    # mambakit writes shards too; transformers reads them; an earlier single file is removed
    out = tmp_path / "mk"
    save_checkpoint(model, out, format="hf")
    save_checkpoint(model, out, format="hf", max_shard_size=30_000)
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    back = transformers.Mamba2ForCausalLM.from_pretrained(out).eval()
    _assert_logits_close(back(prompt).logits, hf(prompt).logits)


@pytest.mark.parametrize("ngroups", [1, 2, 4])
@torch.no_grad()
def test_hf_gated_norm_is_mambakit_gated_norm(ngroups):
    """HF Mamba-2: gate first, then RMS over groups of d_inner / n_groups: norm_before_gate=False."""
    from transformers.models.mamba2.modeling_mamba2 import MambaRMSNormGated

    d_inner = 64
    theirs = MambaRMSNormGated(d_inner, group_size=d_inner // ngroups, eps=1e-5)
    ours = GatedRMSNorm(d_inner, 1e-5, d_inner // ngroups, False)
    weight = torch.randn(d_inner)
    theirs.weight.copy_(weight)
    ours.weight.copy_(weight)
    x, z = torch.randn(3, 5, d_inner), torch.randn(3, 5, d_inner)
    torch.testing.assert_close(ours(x, z), theirs(x, z), rtol=1e-5, atol=1e-5)
    if ngroups > 1:  # the group size matters: one norm over all channels gives other numbers
        whole = GatedRMSNorm(d_inner, 1e-5, d_inner, False)
        whole.weight.copy_(weight)
        assert (whole(x, z) - theirs(x, z)).abs().max() > 1e-3


@torch.no_grad()
def test_hf_mamba1_projection_layout_is_mambakit_layout():
    """HF Mamba-1: in_proj gives x | z, x_proj gives dt (time_step_rank) | B | C, dt_proj maps the low
    rank dt up with its bias: one mixer with the same tensors computes the same output."""
    from mambakit.layers import Mamba1

    hf = _hf_model(1, seed=3, use_bias=True, time_step_rank=6)
    theirs = hf.backbone.layers[0].mixer
    ours = Mamba1(64, 16, 4, 2, 6, bias=True)
    ours.load_state_dict(theirs.state_dict())
    assert ours.x_proj.weight.shape == (6 + 2 * 16, 128)
    x = torch.randn(2, 7, 64)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)


def _saved_hf(tmp_path):
    hf = _hf_model(1, seed=7)
    hf.save_pretrained(tmp_path)
    return tmp_path / "model.safetensors"


def test_missing_unexpected_and_misshaped_keys_name_file_and_keys(tmp_path):
    path = _saved_hf(tmp_path)
    tensors = load_file(path)
    good = dict(tensors)
    del tensors["backbone.layers.1.mixer.A_log"]
    tensors["backbone.layers.1.mixer.extra"] = torch.zeros(3)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError) as e:
        from_pretrained(tmp_path)
    msg = str(e.value)
    assert "model.safetensors" in msg and "backbone.layers.1.mixer.A_log" in msg
    assert "backbone.layers.1.mixer.extra" in msg

    tensors = dict(good)
    tensors["backbone.layers.0.mixer.D"] = torch.zeros(5)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(
        ValueError, match=r"model\.safetensors.*backbone\.layers\.0\.mixer\.D.*\(128,\).*\(5,\)"
    ):
        from_pretrained(tmp_path)

    # a config that does not fit the weights: every layer mismatches, the error lists them
    save_file(good, path, metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    config["state_size"] = 8
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model\.safetensors.*A_log"):
        from_pretrained(tmp_path)


def test_truncated_weights_and_broken_shards_name_the_file(tmp_path):
    path = _saved_hf(tmp_path / "single")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        from_pretrained(tmp_path / "single")

    hf = _hf_model(1, seed=8)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    index_path = tmp_path / "sharded" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"]["backbone.layers.0.mixer.ghost"] = first
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"{first}.*ghost"):
        from_pretrained(tmp_path / "sharded")
    del index["weight_map"]["backbone.layers.0.mixer.ghost"]
    index_path.write_text(json.dumps(index))
    (tmp_path / "sharded" / first).unlink()
    with pytest.raises(FileNotFoundError, match=first):
        from_pretrained(tmp_path / "sharded")


def test_what_hf_cannot_express_is_refused():
    hybrid = ModelConfig(d_model=32, vocab_size=50, pattern="M-M", ssm={"version": 1})
    with pytest.raises(ValueError, match="pattern"):
        config_to_hf(hybrid)
    gate = ModelConfig(
        d_model=32, vocab_size=50, pattern="MM", ssm={"headdim": 16, "d_state": 8, "norm_before_gate": True}
    )
    with pytest.raises(ValueError, match="norm_before_gate"):
        config_to_hf(gate)
    with pytest.raises(ValueError, match="max_shard_size"):
        save_checkpoint(LanguageModel(gate), "unused", format="hf", max_shard_size=0)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"num_heads": 3}, "num_heads \\* head_dim"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"state_size": 0}, "state_size"),
        ({"model_type": "llama"}, "llama"),
    ],
)
def test_hf_configs_mambakit_cannot_load_are_refused_naming_the_file(tmp_path, change, match):
    config = {"model_type": "mamba2", "hidden_size": 64, "num_heads": 8, "head_dim": 16, "vocab_size": 10}
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=match) as e:
        from_pretrained(tmp_path)
    assert "config.json" in str(e.value)


@torch.no_grad()
def test_hf_pytorch_model_bin_loads(tmp_path):
    """Older HF checkpoints ship pytorch_model.bin; it is read with weights_only=True."""
    path = _saved_hf(tmp_path)
    single = from_pretrained(tmp_path)
    torch.save(load_file(path), tmp_path / "pytorch_model.bin")
    path.unlink()
    from_bin = from_pretrained(tmp_path)
    prompt = torch.randint(0, VOCAB, (1, 6))
    assert torch.equal(from_bin(prompt), single(prompt))
