"""The end-of-run sampler: cached stepping and full re-computation pick the same greedy tokens."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mambakit.models import LanguageModel, preset
from mambakit.training.sample import sample


class _ForwardOnly(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model

    def forward(self, ids):
        return self.inner(ids)


@pytest.mark.parametrize("name", ["tiny-mamba2", "hybrid-tiny"])
def test_greedy_cache_equals_full_forward(name):
    torch.manual_seed(0)
    model = LanguageModel(preset(name, d_model=32, ssm={"headdim": 16}))
    with torch.no_grad():  # a sharper distribution than the init, so argmax ties are unlikely
        model.lm_head.weight.mul_(20)
    prompt = [3, 100, 7, 42]
    cached = sample(model, prompt, 12, temperature=0)
    full = sample(_ForwardOnly(model), prompt, 12, temperature=0)
    assert cached == full and len(cached) == 12
    a = sample(model, prompt, 12, temperature=0.9, top_k=5, seed=1)
    assert a == sample(model, prompt, 12, temperature=0.9, top_k=5, seed=1)
    assert all(0 <= t < model.config.vocab_size for t in a)
    with pytest.raises(ValueError, match="prompt_ids"):
        sample(model, [], 3)
    with pytest.raises(ValueError, match="temperature"):
        sample(model, prompt, 3, temperature=-1)
