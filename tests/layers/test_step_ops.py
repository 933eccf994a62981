"""step_ops: CPU decoding steps call the torch backend directly unless a backend is forced."""

from __future__ import annotations

import torch

from mambakit import ops
from mambakit.layers import Block, Mamba1, Mamba2
from mambakit.layers.step_ops import step_ops
from mambakit.ops.ssd import torch as ssd_torch


def test_cpu_uses_torch_backend_unless_overridden(monkeypatch):
    h = torch.zeros(1, 1, 4)
    monkeypatch.delenv("MAMBAKIT_BACKEND", raising=False)
    assert step_ops(h).ssd_state_update is ssd_torch.ssd_state_update_impl
    monkeypatch.setenv("MAMBAKIT_BACKEND", "reference")
    assert step_ops(h).ssd_state_update is ops.ssd_state_update


def test_direct_steps_equal_reference_backend_steps(monkeypatch):
    torch.manual_seed(0)
    for mixer in (Mamba1(16, d_state=4), Mamba2(32, d_state=8, headdim=16, ngroups=2)):
        block = Block(mixer.d_model, mixer)
        x = torch.randn(2, 5, mixer.d_model)
        outs = {}
        for backend in ("auto", "reference"):
            monkeypatch.setenv("MAMBAKIT_BACKEND", backend)
            cache = block.allocate_inference_cache(2, 8)
            with torch.no_grad():
                residual, ys = None, []
                for t in range(x.shape[1]):
                    y, residual = block.step(x[:, t : t + 1], residual, cache)
                    ys.append(y)
            outs[backend] = (torch.cat(ys, 1), cache.ssm_state.clone(), cache.conv_state.clone())
        for a, b in zip(outs["auto"], outs["reference"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
