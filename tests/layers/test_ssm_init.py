"""decay_rates: the cached A = -exp(A_log) of a Mamba layer equals a fresh one and follows A_log."""

from __future__ import annotations

import torch

from mambakit.layers import Mamba1, Mamba2
from mambakit.layers.ssm_init import decay_rates


def test_cached_decay_rates_follow_in_place_updates():
    for layer in (Mamba1(16, d_state=4), Mamba2(32, d_state=8, headdim=16)):
        with torch.no_grad():
            a1 = decay_rates(layer)
            torch.testing.assert_close(a1, -torch.exp(layer.A_log), rtol=0, atol=0)
            assert decay_rates(layer) is a1  # reused while A_log is unchanged
            layer.A_log.add_(0.5)  # as an optimizer step would
            a2 = decay_rates(layer)
            torch.testing.assert_close(a2, -torch.exp(layer.A_log), rtol=0, atol=0)
            layer.load_state_dict({k: v.clone() for k, v in layer.state_dict().items()})
            assert decay_rates(layer) is not a2
        with torch.inference_mode():
            a3 = decay_rates(layer)
        with torch.no_grad():  # an inference tensor is not handed out outside inference_mode
            assert not decay_rates(layer).is_inference()
        torch.testing.assert_close(a3, -torch.exp(layer.A_log.detach()), rtol=0, atol=0)


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
