"""Own checkpoint format: save_pretrained / from_pretrained round trip, files written, corrupt files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from mambakit.models import LanguageModel, from_pretrained, preset, save_pretrained

TOKENS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 8]])


def tiny(tie: bool = True) -> LanguageModel:
    torch.manual_seed(0)
    config = preset(
        "hybrid-tiny",
        d_model=32,
        ssm={"d_state": 8, "headdim": 8, "chunk_size": 8},
        mlp={"d_intermediate": 48},
        tie_embeddings=tie,
    )
    return LanguageModel(config).eval()


@pytest.mark.parametrize("tie", [True, False])
@torch.no_grad()
def test_round_trip_gives_identical_logits(tmp_path, tie):
    model = tiny(tie)
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    with safe_open(tmp_path / "ckpt" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert ("lm_head.weight" in keys) == (not tie)  # a tied head is stored once
    assert "backbone.layers.0.mixer.A_log" in keys and "backbone.norm_f.weight" in keys
    loaded = LanguageModel.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == model.config
    assert torch.equal(loaded(TOKENS), model(TOKENS))
    assert (loaded.lm_head.weight is loaded.backbone.embedding.weight) == tie
    marks = {n for n, p in loaded.named_parameters() if getattr(p, "_no_weight_decay", False)}
    assert marks == {n for n, p in model.named_parameters() if getattr(p, "_no_weight_decay", False)}
    assert "backbone.layers.0.mixer.A_log" in marks
    assert all(p.device.type == "cpu" for p in loaded.parameters())


def test_overwrite_and_dtype(tmp_path):
    model = tiny()
    save_pretrained(model, tmp_path)
    with torch.no_grad():
        model.backbone.norm_f.weight.add_(1.0)
    save_pretrained(model, tmp_path)  # replaces the files in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.backbone.embedding.weight.dtype == torch.bfloat16
    torch.testing.assert_close(loaded.backbone.norm_f.weight.float(), model.backbone.norm_f.weight.detach())


def test_truncated_or_corrupt_weights_name_the_file(tmp_path):
    tiny().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        from_pretrained(tmp_path)
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="model.safetensors"):
        from_pretrained(tmp_path)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(tmp_path / "nowhere")


def test_weights_that_do_not_fit_the_config(tmp_path):
    tiny().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["mlp"]["d_intermediate"] = 40
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="fc1.weight"):
        from_pretrained(tmp_path)
    config["pattern"] = config["pattern"] + "-"
    config["mlp"]["d_intermediate"] = 48
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="missing keys"):
        from_pretrained(tmp_path)
