"""decay_rates: A = -exp(A_log) of a Mamba layer, with gradients, in every mode."""

from __future__ import annotations

import torch

from mambakit.layers import Mamba1, Mamba2
from mambakit.layers.ssm_init import decay_rates


def test_decay_rates_follow_every_update():
    for layer in (Mamba1(16, d_state=4), Mamba2(32, d_state=8, headdim=16)):
        with torch.no_grad():
            torch.testing.assert_close(decay_rates(layer), -torch.exp(layer.A_log), rtol=0, atol=0)
            layer.A_log.data.add_(0.5)  # a write no version counter sees
            torch.testing.assert_close(decay_rates(layer), -torch.exp(layer.A_log), rtol=0, atol=0)


def test_decay_rates_with_autograd_reach_A_log():
    layer = Mamba1(16, d_state=4)
    decay_rates(layer).sum().backward()
    torch.testing.assert_close(layer.A_log.grad, -torch.exp(layer.A_log.detach()))


def test_layer_built_under_inference_mode_steps():
    with torch.inference_mode():
        layer = Mamba1(16, d_state=4)
        torch.testing.assert_close(decay_rates(layer), -torch.exp(layer.A_log), rtol=0, atol=0)
        cache = layer.allocate_inference_cache(1, 4)
        assert layer.step(torch.randn(1, 1, 16), cache).shape == (1, 1, 16)
