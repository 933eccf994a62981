"""A Mamba block's decoding step as one fused op (`Mamba1.block_step` / `Mamba2.block_step`, i.e.
`ops.mamba1_block_step` / `ops.mamba2_block_step`): it is taken where the Triton backend is chosen (here
MAMBAKIT_BACKEND=triton, the kernels through the interpreter) and gives the same logits as the unfused
step and the full forward."""

from __future__ import annotations

import pytest
import torch

import mambakit.ops
from mambakit.models.lm import LanguageModel
from mambakit.models.presets import preset

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


SSM = {1: {"d_state": 8}, 2: {"d_state": 16, "headdim": 16, "ngroups": 2, "chunk_size": 8}}


def _model(version: int = 1, seed: int = 0, pattern: str = "MMM") -> LanguageModel:
    torch.manual_seed(seed)
    config = preset(
        f"tiny-mamba{version}", d_model=32, vocab_size=100, pattern=pattern, ssm=SSM[version],
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
    for name in ("mamba1_block_step", "mamba2_block_step"):
        real = getattr(mambakit.ops, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(mambakit.ops, name, spy)
    return calls


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("pattern", ["MMM", "M*M-"])
@torch.no_grad()
def test_fused_decoding_equals_forward(monkeypatch, fused_calls, version, pattern):
    model = _model(version, pattern=pattern)
    tokens = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    full = model(tokens)
    monkeypatch.setenv("MAMBAKIT_FUSED_STEP", "0")
    unfused = _decode(model, tokens, 7)
    assert not fused_calls
    monkeypatch.delenv("MAMBAKIT_FUSED_STEP")
    monkeypatch.setenv("MAMBAKIT_BACKEND", "triton")  # on CPU: the kernels through the interpreter
    fused = _decode(model, tokens, 7)
    assert fused_calls == [f"mamba{version}_block_step"] * (pattern.count("M") * 5)
    for got in (fused, unfused):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-4 * full.abs().max().item())


@pytest.mark.parametrize("version", [1, 2])
@torch.no_grad()
def test_fused_step_is_skipped_where_it_does_not_apply(monkeypatch, fused_calls, version):
    model = _model(version)
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


@pytest.mark.parametrize("version", [1, 2])
@torch.no_grad()
def test_compiled_step_takes_the_fused_op(monkeypatch, fused_calls, version):
    """torch.compile of `model.step` (aot_eager: tracing without CPU code generation) keeps the fused
    op as one node, through its fake implementation and declared in-place writes, and gives the
    eager step's logits."""
    model = _model(version)
    tokens = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    monkeypatch.setenv("MAMBAKIT_BACKEND", "triton")
    eager = _decode(model, tokens, 3)
    eager_calls = len(fused_calls)
    torch._dynamo.reset()
    step = torch.compile(model.step, backend="aot_eager")
    cache = model.allocate_inference_cache(2, 6)
    outs = [model(tokens[:, :3], cache=cache)]
    for t in range(3, 6):
        outs.append(step(tokens[:, t : t + 1], cache))
    assert len(fused_calls) > eager_calls  # the traced step reached the fused op
    torch.testing.assert_close(torch.cat(outs, 1), eager, rtol=1e-5, atol=1e-5)
