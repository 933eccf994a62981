"""Mamba2 layer against a float64 re-derivation from its parameters (in_proj order z|x|B|C|dt, conv,
per-head recurrence, grouped gated RMSNorm), its initialization, and float64 gradcheck."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from mambakit.layers import Mamba2


def naive_mamba2(m: Mamba2, u: torch.Tensor) -> torch.Tensor:
    """u (batch, seqlen, d_model) float64 -> (batch, seqlen, d_model), one token at a time."""
    p = {k: v.detach().double() for k, v in m.state_dict().items()}
    batch, seqlen, _ = u.shape
    H, P, G, N, W = m.nheads, m.headdim, m.ngroups, m.d_state, m.d_conv
    zxbcdt = F.linear(u, p["in_proj.weight"], p.get("in_proj.bias"))
    z, xBC, dt = zxbcdt.split([m.d_inner, m.conv_dim, H], dim=-1)
    padded = F.pad(xBC, (0, 0, W - 1, 0))
    w = p["conv1d.weight"][:, 0]
    xBC = sum(w[:, k] * padded[:, k : k + seqlen] for k in range(W)) + p["conv1d.bias"]
    xBC = F.silu(xBC)
    x, B, C = xBC.split([m.d_inner, G * N, G * N], dim=-1)
    x = x.reshape(batch, seqlen, H, P)
    B, C = B.reshape(batch, seqlen, G, N), C.reshape(batch, seqlen, G, N)
    dt = F.softplus(dt + p["dt_bias"]).clamp(*m.dt_limit)
    A = -torch.exp(p["A_log"])
    group = torch.arange(H) // (H // G)
    h = torch.zeros(batch, H, P, N, dtype=torch.float64)
    ys = []
    for t in range(seqlen):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]
        h = decay * h + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, group][:, :, None, :]
        ys.append((h * C[:, t, group][:, :, None, :]).sum(-1) + p["D"][:, None] * x[:, t])
    y = torch.stack(ys, dim=1).reshape(batch, seqlen, m.d_inner)
    gs = m.d_inner // G

    def group_rms(t):
        t = t.reshape(batch, seqlen, G, gs)
        return (t / torch.sqrt(t.square().mean(-1, keepdim=True) + m.norm.eps)).reshape(batch, seqlen, -1)

    if m.norm.norm_before_gate:
        y = group_rms(y) * p["norm.weight"] * F.silu(z)
    else:
        y = group_rms(y * F.silu(z)) * p["norm.weight"]
    return F.linear(y, p["out_proj.weight"], p.get("out_proj.bias"))


CASES = [
    dict(d_state=8, headdim=8, ngroups=1, chunk_size=8),
    dict(d_state=16, headdim=8, ngroups=4, chunk_size=16, norm_before_gate=True),
    dict(d_state=4, headdim=16, ngroups=2, chunk_size=4, dt_limit=(0.002, 0.05), bias=True, d_conv=2),
]


@pytest.mark.parametrize("kw", CASES)
@pytest.mark.parametrize("seqlen", [1, 13, 33])
@torch.no_grad()
def test_matches_float64_recurrence(kw, seqlen):
    torch.manual_seed(seqlen)
    m = Mamba2(32, **kw)
    for name, p in m.named_parameters():
        if name in ("D", "norm.weight", "dt_bias") or name.endswith(".bias"):
            p.add_(0.3 * torch.randn_like(p))
    u = torch.randn(2, seqlen, 32)
    out = m(u)
    ref = naive_mamba2(m, u.double())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_shapes_and_initialization():
    torch.manual_seed(0)
    m = Mamba2(64, d_state=16, headdim=16, ngroups=2, A_init_range=(2, 8), dt_min=0.01, dt_max=0.05)
    d_inner, nheads = 128, 8
    assert m.in_proj.weight.shape == (2 * d_inner + 2 * 2 * 16 + nheads, 64)
    assert m.conv1d.weight.shape == (d_inner + 2 * 2 * 16, 1, 4)
    assert m.norm.weight.shape == (d_inner,) and m.norm.group_size == d_inner // 2
    assert m.out_proj.weight.shape == (64, d_inner)
    A = torch.exp(m.A_log)
    assert A.shape == (nheads,) and bool((A >= 2).all() and (A <= 8).all())
    dt = F.softplus(m.dt_bias)
    assert bool((dt >= 0.01 - 1e-6).all() and (dt <= 0.05 + 1e-6).all())
    assert torch.equal(m.D, torch.ones(nheads))
    for p in (m.A_log, m.D, m.dt_bias):
        assert getattr(p, "_no_weight_decay", False)
    assert not getattr(m.in_proj.weight, "_no_weight_decay", False)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(headdim=7), "headdim"),
        (dict(headdim=8, ngroups=3), "ngroups"),
        (dict(A_init_range=(0, 1)), "A_init"),
    ],
)
def test_bad_constructor_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        Mamba2(32, **kw)


def test_gradcheck_float64():
    torch.manual_seed(0)
    m = Mamba2(8, d_state=4, headdim=4, ngroups=2, chunk_size=2, d_conv=3).double()
    names = ["A_log", "D", "dt_bias", "norm.weight", "conv1d.weight"]
    params = {k: v for k, v in m.named_parameters()}
    u = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    leaves = [params[n].detach().clone().requires_grad_() for n in names]

    def f(u, *vals):
        return functional_call(m, {**params, **dict(zip(names, vals))}, (u,))

    assert torch.autograd.gradcheck(f, (u, *leaves), eps=1e-6, atol=1e-5)


def test_float64_step_state_dtype():
    m = Mamba2(16, d_state=4, headdim=8).double()
    cache = m.allocate_inference_cache(1, 4)
    assert cache.ssm_state.dtype == torch.float64 and cache.conv_state.dtype == torch.float64
    m32 = Mamba2(16, d_state=4, headdim=8)
    cache = m32.allocate_inference_cache(1, 4, dtype=torch.bfloat16)
    assert cache.ssm_state.dtype == torch.float32 and cache.conv_state.dtype == torch.bfloat16
    assert cache.ssm_state.shape == (1, 4, 8, 4) and cache.conv_state.shape == (1, 32 + 8, 3)
    assert math.isinf(m.dt_limit[1])
