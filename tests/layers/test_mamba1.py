"""Mamba1 layer against a float64 re-derivation from its parameters (in_proj x|z, conv, x_proj
dt|B|C, dt_proj, selective recurrence, silu(z) gate), its initialization, and float64 gradcheck."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from mambakit.layers import Mamba1


def naive_mamba1(m: Mamba1, u: torch.Tensor) -> torch.Tensor:
    """u (batch, seqlen, d_model) float64 -> (batch, seqlen, d_model), one token at a time."""
    p = {k: v.detach().double() for k, v in m.state_dict().items()}
    batch, seqlen, _ = u.shape
    W, N, R = m.d_conv, m.d_state, m.dt_rank
    x, z = F.linear(u, p["in_proj.weight"], p.get("in_proj.bias")).chunk(2, dim=-1)
    padded = F.pad(x, (0, 0, W - 1, 0))
    w = p["conv1d.weight"][:, 0]
    x = sum(w[:, k] * padded[:, k : k + seqlen] for k in range(W))
    x = F.silu(x + p["conv1d.bias"] if "conv1d.bias" in p else x)
    dt_low, B, C = F.linear(x, p["x_proj.weight"]).split([R, N, N], dim=-1)
    dt = F.softplus(F.linear(dt_low, p["dt_proj.weight"], p["dt_proj.bias"]))
    A = -torch.exp(p["A_log"])
    h = torch.zeros(batch, m.d_inner, N, dtype=torch.float64)
    ys = []
    for t in range(seqlen):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * x[:, t])[:, :, None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1) + p["D"] * x[:, t])
    y = torch.stack(ys, dim=1) * F.silu(z)
    return F.linear(y, p["out_proj.weight"], p.get("out_proj.bias"))


CASES = [
    dict(d_state=8),
    dict(d_state=4, d_conv=2, expand=1, dt_rank=5, bias=True),
    dict(d_state=16, conv_bias=False),
]


@pytest.mark.parametrize("kw", CASES)
@pytest.mark.parametrize("seqlen", [1, 13, 40])
@torch.no_grad()
def test_matches_float64_recurrence(kw, seqlen):
    torch.manual_seed(seqlen)
    m = Mamba1(32, **kw)
    for name, p in m.named_parameters():
        if name == "D" or name.endswith(".bias"):
            p.add_(0.3 * torch.randn_like(p))
    u = torch.randn(2, seqlen, 32)
    out = m(u)
    ref = naive_mamba1(m, u.double())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_shapes_and_initialization():
    torch.manual_seed(0)
    m = Mamba1(40, d_state=8, dt_min=0.002, dt_max=0.02, dt_init_floor=0.005)
    d_inner, dt_rank = 80, math.ceil(40 / 16)
    assert m.dt_rank == dt_rank
    assert m.in_proj.weight.shape == (2 * d_inner, 40)
    assert m.conv1d.weight.shape == (d_inner, 1, 4) and m.conv1d.bias.shape == (d_inner,)
    assert m.x_proj.weight.shape == (dt_rank + 16, d_inner) and m.x_proj.bias is None
    assert m.dt_proj.weight.shape == (d_inner, dt_rank)
    assert m.out_proj.weight.shape == (40, d_inner)
    torch.testing.assert_close(m.A_log, torch.log(torch.arange(1.0, 9.0)).expand(d_inner, 8))
    assert torch.equal(m.D, torch.ones(d_inner))
    dt = F.softplus(m.dt_proj.bias)
    assert bool((dt >= 0.005 - 1e-6).all() and (dt <= 0.02 + 1e-6).all())
    assert m.dt_proj.weight.abs().max() <= dt_rank**-0.5
    for p in (m.A_log, m.D, m.dt_proj.bias):
        assert getattr(p, "_no_weight_decay", False)
    assert getattr(m.dt_proj.weight, "_no_reinit", False) and getattr(m.dt_proj.bias, "_no_reinit", False)


def test_bad_dt_rank():
    with pytest.raises(ValueError, match="dt_rank"):
        Mamba1(32, dt_rank=0)
    with pytest.raises(ValueError, match="dt_min"):
        Mamba1(32, dt_min=0.5, dt_max=0.1)


def test_gradcheck_float64():
    torch.manual_seed(0)
    m = Mamba1(8, d_state=3, d_conv=3, expand=1).double()
    names = ["A_log", "D", "dt_proj.bias", "dt_proj.weight", "conv1d.weight"]
    params = dict(m.named_parameters())
    u = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    leaves = [params[n].detach().clone().requires_grad_() for n in names]

    def f(u, *vals):
        return functional_call(m, {**params, **dict(zip(names, vals))}, (u,))

    assert torch.autograd.gradcheck(f, (u, *leaves), eps=1e-6, atol=1e-5)


def test_state_shapes_and_dtypes():
    m = Mamba1(16, d_state=4)
    cache = m.allocate_inference_cache(3, 4, dtype=torch.bfloat16)
    assert cache.conv_state.shape == (3, 32, 3) and cache.conv_state.dtype == torch.bfloat16
    assert cache.ssm_state.shape == (3, 32, 4) and cache.ssm_state.dtype == torch.float32


@torch.no_grad()
def test_step_above_the_dt_proj_batch_equals_forward(monkeypatch):
    """At large batch (DT_PROJ_IN_STEP_MAX_ELEMENTS) the step applies dt_proj as a GEMM before the
    state update; decoding still equals the full forward."""
    import mambakit.layers.mamba1 as mamba1

    torch.manual_seed(0)
    layer = Mamba1(16, d_state=4)
    batch = 3
    monkeypatch.setattr(mamba1, "DT_PROJ_IN_STEP_MAX_ELEMENTS", 2 * layer.dt_proj.weight.numel())
    x = torch.randn(batch, 6, 16)
    full = layer(x)
    cache = layer.allocate_inference_cache(batch, 6)
    steps = torch.cat([layer.step(x[:, t : t + 1], cache) for t in range(6)], dim=1)
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-5)
