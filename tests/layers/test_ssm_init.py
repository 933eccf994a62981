"""The decoding steps form A = -exp(A_log) inside the step ops (`A_is_log=True`): every step sees the
current A_log, including writes no version counter sees, and layers built under inference mode step."""

from __future__ import annotations

import pytest
import torch

from mambakit.layers import Mamba1, Mamba2
from mambakit.layers.ssm_init import cache_ssm_dtype


def _step_equals_forward(layer, x):
    cache = layer.allocate_inference_cache(x.shape[0], x.shape[1])
    steps = torch.cat([layer.step(x[:, t : t + 1], cache) for t in range(x.shape[1])], dim=1)
    torch.testing.assert_close(steps, layer(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make", [lambda: Mamba1(16, d_state=4), lambda: Mamba2(32, d_state=8, headdim=16)])
def test_steps_follow_every_update_of_A_log(make):
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(2, 5, layer.d_model)
    with torch.no_grad():
        _step_equals_forward(layer, x)
        layer.A_log.data.add_(0.5)  # a write no version counter sees
        _step_equals_forward(layer, x)


def test_layer_built_under_inference_mode_steps():
    with torch.inference_mode():
        layer = Mamba1(16, d_state=4)
        cache = layer.allocate_inference_cache(1, 4)
        assert layer.step(torch.randn(1, 1, 16), cache).shape == (1, 1, 16)


def test_cache_ssm_dtype():
    assert cache_ssm_dtype(torch.bfloat16, None) == torch.float32
    assert cache_ssm_dtype(torch.float64, None) == torch.float64
    assert cache_ssm_dtype(torch.float32, torch.bfloat16) == torch.bfloat16
    with pytest.raises(ValueError, match="ssm_dtype"):
        cache_ssm_dtype(torch.float32, torch.int8)
