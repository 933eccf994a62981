"""A Mamba-1 block's decoding step as one fused op (`Mamba1.block_step`, `ops.mamba1_block_step`): it is
taken where the Triton backend is chosen (here MAMBAKIT_BACKEND=triton, the kernels through the
interpreter) and gives the same logits as the unfused step and the full forward."""

from __future__ import annotations

import pytest
import torch

import mambakit.ops
from mambakit.models.lm import LanguageModel
from mambakit.models.presets import preset

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _model(seed: int = 0, pattern: str = "MMM") -> LanguageModel:
    torch.manual_seed(seed)
    config = preset(
        "tiny-mamba1", d_model=32, vocab_size=100, pattern=pattern, ssm={"d_state": 8},
        attn={"num_heads": 4, "num_kv_heads": 2}, mlp={"d_intermediate": 48},
    )  # fmt: skip
    return LanguageModel(config).to(DEVICE).eval()


def _decode(model, tokens, prefill):
    cache = model.allocate_inference_cache(tokens.shape[0], tokens.shape[1])
    outs = [model(tokens[:, :prefill], cache=cache)]
    for t in range(prefill, tokens.shape[1]):
        outs.append(model.step(tokens[:, t : t + 1], cache))
    return torch.cat(outs, dim=1)


@pytest.fixture
def fused_calls(monkeypatch):
    calls = []
    real = mambakit.ops.mamba1_block_step

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(mambakit.ops, "mamba1_block_step", spy)
    return calls


@pytest.mark.parametrize("pattern", ["MMM", "M*M-"])
@torch.no_grad()
def test_fused_decoding_equals_forward(monkeypatch, fused_calls, pattern):
    model = _model(pattern=pattern)
    tokens = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    full = model(tokens)
    monkeypatch.setenv("MAMBAKIT_FUSED_STEP", "0")
    unfused = _decode(model, tokens, 7)
    assert not fused_calls
    monkeypatch.delenv("MAMBAKIT_FUSED_STEP")
    monkeypatch.setenv("MAMBAKIT_BACKEND", "triton")  # on CPU: the kernels through the interpreter
    fused = _decode(model, tokens, 7)
    assert len(fused_calls) == pattern.count("M") * 5
    for got in (fused, unfused):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-4 * full.abs().max().item())


@torch.no_grad()
def test_fused_step_is_skipped_where_it_does_not_apply(monkeypatch, fused_calls):
    model = _model()
    tokens = torch.randint(0, 100, (2, 4), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    monkeypatch.setenv("MAMBAKIT_BACKEND", "triton")
    monkeypatch.setenv("MAMBAKIT_FUSED_STEP", "0")
    off = _decode(model, tokens, 2)
    assert not fused_calls
    monkeypatch.delenv("MAMBAKIT_FUSED_STEP")
    with torch.enable_grad():  # autograd recording: the unfused, differentiable step
        _decode(model, tokens, 2)
    assert not fused_calls
    on = _decode(model, tokens, 2)
    assert len(fused_calls) == 3 * 2
    torch.testing.assert_close(on, off, rtol=1e-4, atol=1e-5)
