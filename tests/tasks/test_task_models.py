"""The five task models: they build and run; the LTI ablation's Δ, B, C do not depend on the input while
Mamba-1's do; the LTI layer decodes step by step as it runs in one pass."""

from __future__ import annotations

import pytest
import torch

from mambakit.tasks.models import MODEL_NAMES, LTIMamba1, build_task_model, task_model_config


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_models_build_and_run(name):
    torch.manual_seed(0)
    model = build_task_model(name, vocab_size=12, d_model=32, n_layers=2)
    logits = model(torch.randint(0, 12, (2, 10)))
    assert logits.shape == (2, 10, 12)
    logits.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_model_kinds():
    assert task_model_config("mamba1", 16).ssm.version == 1
    assert task_model_config("mamba2", 16).pattern == "MM"
    assert set(task_model_config("hybrid", 16, n_layers=4).pattern) == {"M", "*"}
    assert task_model_config("hybrid", 16).pattern[0] == "M"
    attn = task_model_config("attention", 16)
    assert "M" not in attn.pattern and attn.attn.rotary_emb_dim > 0  # positions from rotary embeddings
    model = build_task_model("lti", 16, d_model=32)
    assert all(isinstance(block.mixer, LTIMamba1) for block in model.backbone.layers)


def test_lti_parameters_do_not_depend_on_input_and_mamba1s_do():
    torch.manual_seed(0)
    lti = build_task_model("lti", 16, d_model=32).backbone.layers[0].mixer
    s6 = build_task_model("mamba1", 16, d_model=32).backbone.layers[0].mixer
    x1, x2 = torch.randn(2, 5, lti.d_inner), torch.randn(2, 5, lti.d_inner)
    for a, b in zip(lti._ssm_inputs(x1), lti._ssm_inputs(x2)):
        assert torch.equal(a, b)
        assert torch.equal(a[:, :1].expand_as(a), a)  # the same at every position
    assert not torch.equal(s6._ssm_inputs(x1)[1], s6._ssm_inputs(x2)[1])
    assert not hasattr(lti, "x_proj")


def test_lti_step_matches_forward():
    torch.manual_seed(0)
    layer = LTIMamba1(16, d_state=4).double()
    with torch.no_grad():
        layer.C.normal_()
    hidden = torch.randn(2, 7, 16, dtype=torch.float64)
    full = layer(hidden)
    cache = layer.allocate_inference_cache(2, 7)
    steps = torch.cat([layer.step(hidden[:, t : t + 1], cache) for t in range(7)], dim=1)
    torch.testing.assert_close(steps, full)


def test_bad_model_arguments_are_named():
    with pytest.raises(ValueError, match="name"):
        build_task_model("s4", 16)
    with pytest.raises(ValueError, match="n_layers"):
        build_task_model("hybrid", 16, n_layers=1)
