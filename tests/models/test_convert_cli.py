"""`mambakit convert`: end to end between the three formats (logits unchanged through every hop),
sharding, dtype, and the refusals (exit code 2 with a message, nothing written)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mambakit.cli import main
from mambakit.models import LanguageModel, ModelConfig, from_pretrained
from mambakit.models.formats import detect_format, save_checkpoint


def _model(pattern: str, version: int = 2) -> LanguageModel:
    torch.manual_seed(0)
    config = ModelConfig(
        d_model=32, vocab_size=70, pattern=pattern,
        ssm={"version": version, "d_state": 8, "headdim": 16, "chunk_size": 4},
        attn={"num_heads": 4, "num_kv_heads": 2}, mlp={"d_intermediate": 128}, tie_embeddings=False,
    )  # fmt: skip
    model = LanguageModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


IDS = torch.tensor([[5, 1, 66, 2, 9, 30, 4, 0, 12], [8, 8, 3, 69, 41, 7, 2, 5, 1]])


@torch.no_grad()
def _same_logits(a: LanguageModel, b: LanguageModel) -> None:
    la, lb = a(IDS), b(IDS)
    assert torch.isfinite(la).all()
    torch.testing.assert_close(la, lb, rtol=0, atol=0)  # conversion only renames and copies


def test_hybrid_official_to_mambakit_and_back(tmp_path, capsys):
    model = _model("M-*-M-")
    save_checkpoint(model, tmp_path / "official", format="official")
    assert main(["convert", str(tmp_path / "official"), str(tmp_path / "mk")]) == 0
    assert "official" in capsys.readouterr().out
    assert detect_format(tmp_path / "mk") == "mambakit"
    _same_logits(from_pretrained(tmp_path / "mk"), model)

    assert main(["convert", str(tmp_path / "mk"), str(tmp_path / "official2"), "--to", "official"]) == 0
    first = torch.load(tmp_path / "official" / "pytorch_model.bin", weights_only=True)
    second = torch.load(tmp_path / "official2" / "pytorch_model.bin", weights_only=True)
    assert set(first) == set(second) and all(torch.equal(first[k], second[k]) for k in first)
    assert json.loads((tmp_path / "official" / "config.json").read_text()) == json.loads(
        (tmp_path / "official2" / "config.json").read_text()
    )


@pytest.mark.parametrize("version", [1, 2])
def test_mambakit_to_sharded_hf_to_official_to_mambakit(tmp_path, version):
    model = _model("MM", version)
    model.save_pretrained(tmp_path / "mk")
    assert (
        main(
            ["convert", str(tmp_path / "mk"), str(tmp_path / "hf"), "--to", "hf", "--max-shard-size", "20KB"]
        )
        == 0
    )
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert "backbone.embeddings.weight" in index["weight_map"]
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "off"), "--to", "official"]) == 0
    assert main(["convert", str(tmp_path / "off"), str(tmp_path / "mk2")]) == 0
    back = from_pretrained(tmp_path / "mk2")
    _same_logits(back, model)  # the padded vocabulary rows never reach the logits


def test_dtype_and_overwrite(tmp_path, capsys):
    _model("MM").save_pretrained(tmp_path / "src")
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "config.json").write_text("{}")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (
        main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--overwrite", "--dtype", "bfloat16"])
        == 0
    )
    tensors = load_file(tmp_path / "dst" / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--to", "hf"], "pattern"),  # HF Mamba models hold no attention or MLP layers
        (["--max-shard-size", "1MB"], "--max-shard-size"),
    ],
)
def test_refusals_exit_2_and_write_nothing(tmp_path, capsys, extra, message):
    _model("M-*-").save_pretrained(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "dst").exists() or not any((tmp_path / "dst").iterdir())


def test_bad_sources_exit_2_naming_the_problem(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "dst")]) == 2
    assert "config.json" in capsys.readouterr().err
    _model("MM").save_pretrained(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "src"), "--overwrite"]) == 2
    assert "same directory" in capsys.readouterr().err
    (tmp_path / "src" / "model.safetensors").write_bytes(b"\0" * 32)
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst")]) == 2
    assert "model.safetensors" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--max-shard-size", "lots"])
