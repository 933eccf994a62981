"""MLP, RMSNorm, GatedRMSNorm and the pre-norm residual Block against their float64 formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mambakit.layers import MLP, Block, GatedRMSNorm, RMSNorm


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt(x.square().mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("activation", ["swiglu", "relu2"])
@pytest.mark.parametrize("bias", [False, True])
@torch.no_grad()
def test_mlp_matches_formula(activation, bias):
    torch.manual_seed(0)
    m = MLP(16, 24, activation, bias=bias)
    assert m.fc1.weight.shape == ((48 if activation == "swiglu" else 24), 16) and m.fc2.weight.shape == (
        16,
        24,
    )
    u = torch.randn(3, 7, 16)
    p = {k: v.double() for k, v in m.state_dict().items()}
    h = F.linear(u.double(), p["fc1.weight"], p.get("fc1.bias"))
    if activation == "swiglu":
        h = h[..., :24] * F.silu(h[..., 24:])
    else:
        h = torch.relu(h) ** 2
    ref = F.linear(h, p["fc2.weight"], p.get("fc2.bias"))
    torch.testing.assert_close(m(u).double(), ref, rtol=1e-5, atol=1e-5)
    assert m.allocate_inference_cache(3, 8) is None


def test_mlp_bad_arguments():
    with pytest.raises(ValueError, match="activation"):
        MLP(16, 24, "gelu")
    with pytest.raises(ValueError, match="d_intermediate"):
        MLP(16, 0)


@torch.no_grad()
def test_norms_match_formulas():
    torch.manual_seed(0)
    x, z = torch.randn(2, 5, 24), torch.randn(2, 5, 24)
    n = RMSNorm(24, eps=1e-3)
    n.weight.copy_(torch.randn(24))
    torch.testing.assert_close(n(x), _rms(x, 1e-3) * n.weight, rtol=1e-5, atol=1e-6)
    for before in (False, True):
        g = GatedRMSNorm(24, eps=1e-5, group_size=8, norm_before_gate=before)
        g.weight.copy_(torch.randn(24))

        def grouped(t):
            return _rms(t.reshape(2, 5, 3, 8), 1e-5).reshape(2, 5, 24)

        ref = grouped(x) * g.weight * F.silu(z) if before else grouped(x * F.silu(z)) * g.weight
        torch.testing.assert_close(g(x, z), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("residual_in_fp32", [False, True])
def test_block_is_prenorm_residual(residual_in_fp32):
    torch.manual_seed(0)
    mixer = MLP(16, 32)
    block = Block(16, mixer, norm_eps=1e-5, residual_in_fp32=residual_in_fp32)
    with torch.no_grad():
        block.norm.weight.copy_(torch.randn(16))
    h, r = torch.randn(2, 6, 16), torch.randn(2, 6, 16)
    out, res = block(h, r)
    torch.testing.assert_close(res.float(), h + r)
    assert res.dtype == (torch.float32 if residual_in_fp32 else h.dtype)
    torch.testing.assert_close(out, mixer(_rms(h + r, 1e-5) * block.norm.weight), rtol=1e-5, atol=1e-5)
    out0, res0 = block(h)  # the first block has no residual yet
    torch.testing.assert_close(res0, h)
    torch.testing.assert_close(out0, mixer(_rms(h, 1e-5) * block.norm.weight), rtol=1e-5, atol=1e-5)
    step_out, step_res = block.step(h[:, :1], r[:, :1], None)
    torch.testing.assert_close(step_out, out[:, :1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step_res, res[:, :1])
    assert getattr(block.norm.weight, "_no_weight_decay", False)
