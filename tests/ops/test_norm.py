"""Tests of rms_norm, gated_rms_norm and add_rms_norm: every backend against float64 definitions
written here (and torch's own F.rms_norm), forward and gradients, dtypes, gradcheck, argument errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mambakit.ops import add_rms_norm, gated_rms_norm, rms_norm

BACKENDS = ("reference", "torch")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 1e-2), torch.float16: (2e-3, 2e-3)}
SHAPES = [(7,), (3, 12), (2, 5, 24), (2, 1, 3, 96), (4, 130)]  # (..., dim), dims not all powers of two
EPS = 1e-5


def rand(shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g)).to(dtype)


def rms_def(x, weight, eps):
    """Row by row in float64: x / sqrt(mean(x^2) + eps) * weight."""
    x = x.double()
    ms = (x * x).sum(-1, keepdim=True) / x.shape[-1]
    return x / torch.sqrt(ms + eps) * weight.double()


def gated_def(x, z, weight, eps, group_size, norm_before_gate):
    x, z, weight = x.double(), z.double(), weight.double()
    gate = z * torch.sigmoid(z)
    h = x if norm_before_gate else x * gate
    groups = [
        rms_def(h[..., i : i + group_size], weight[i : i + group_size], eps)
        for i in range(0, h.shape[-1], group_size)
    ]
    y = torch.cat(groups, -1)
    return y * gate if norm_before_gate else y


def _leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_() for t in ts]


def _compare(got, want, dtype, name="", tol_dtype=None):
    assert got.dtype == dtype, name
    assert torch.isfinite(got).all(), name
    rtol, atol = TOL[tol_dtype or dtype]
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_fwd_bwd(backend, dtype, shape):
    x, w = rand(shape, dtype, seed=len(shape)), rand(shape[-1:], seed=1, scale=0.5) + 1
    gy = rand(shape, seed=2)
    xg, wg = _leaves(x, w)
    y = rms_norm(xg, wg, EPS, backend=backend)
    (y.double() * gy).sum().backward()
    xd, wd = _leaves(x.double(), w.double())
    want = rms_def(xd, wd, EPS)
    (want * gy).sum().backward()
    _compare(y, want.detach(), dtype)
    with torch.inference_mode():  # backends may take another path when autograd is off
        _compare(rms_norm(x, w, EPS, backend=backend), want.detach(), dtype, "no grad")
    # the gradient is of the dtype-rounded input; compare in float32 scale
    _compare(xg.grad, xd.grad, dtype, "x.grad")
    assert wg.grad.dtype == torch.float32
    torch.testing.assert_close(wg.grad.double(), wd.grad, rtol=TOL[dtype][0], atol=TOL[dtype][1] * 4)


def test_rms_norm_matches_torch_functional():
    x, w = rand((3, 4, 40), seed=5), rand((40,), seed=6)
    want = F.rms_norm(x, (40,), w, 1e-6)
    for backend in BACKENDS:
        torch.testing.assert_close(rms_norm(x, w, 1e-6, backend=backend), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("shape,group_size", [((5, 12), None), ((2, 3, 12), 4), ((1, 4, 96), 32), ((6,), 1)])
def test_gated_rms_norm_fwd_bwd(backend, dtype, norm_before_gate, shape, group_size):
    x, z = rand(shape, dtype, seed=3), rand(shape, dtype, seed=4)
    w = rand(shape[-1:], seed=5, scale=0.5) + 1
    gy = rand(shape, seed=6)
    xg, zg, wg = _leaves(x, z, w)
    y = gated_rms_norm(xg, zg, wg, EPS, group_size, norm_before_gate, backend=backend)
    (y.double() * gy).sum().backward()
    xd, zd, wd = _leaves(x.double(), z.double(), w.double())
    want = gated_def(xd, zd, wd, EPS, group_size or shape[-1], norm_before_gate)
    (want * gy).sum().backward()
    _compare(y, want.detach(), dtype)
    with torch.inference_mode():
        y_ng = gated_rms_norm(x, z, w, EPS, group_size, norm_before_gate, backend=backend)
    _compare(y_ng, want.detach(), dtype, "no grad")
    _compare(xg.grad, xd.grad, dtype, "x.grad")
    _compare(zg.grad, zd.grad, dtype, "z.grad")
    torch.testing.assert_close(wg.grad.double(), wd.grad, rtol=TOL[dtype][0], atol=TOL[dtype][1] * 4)


def test_gated_groups_are_independent():
    # scaling one group of x must leave the other group's output unchanged (norm_before_gate=True)
    x, z, w = rand((3, 8), seed=1), rand((3, 8), seed=2), rand((8,), seed=3)
    for backend in BACKENDS:
        y1 = gated_rms_norm(x, z, w, EPS, 4, True, backend=backend)
        x2 = x.clone()
        x2[:, 4:] *= 10
        y2 = gated_rms_norm(x2, z, w, EPS, 4, True, backend=backend)
        torch.testing.assert_close(y1[:, :4], y2[:, :4], rtol=0, atol=0)
        torch.testing.assert_close(y1[:, 4:], y2[:, 4:], rtol=1e-5, atol=1e-5)  # scale-invariant
        assert not torch.allclose(
            gated_rms_norm(x2, z, w, EPS, None, True, backend=backend)[:, :4], y1[:, :4]
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual_in_fp32", [False, True])
@pytest.mark.parametrize("has_residual", [False, True])
@pytest.mark.parametrize("shape", [(2, 5, 24), (3, 130)])
def test_add_rms_norm_fwd_bwd(backend, dtype, residual_in_fp32, has_residual, shape):
    x = rand(shape, dtype, seed=7)
    res_dtype = torch.float32 if residual_in_fp32 else dtype
    residual = rand(shape, res_dtype, seed=8) if has_residual else None
    w = rand(shape[-1:], seed=9, scale=0.5) + 1
    gy, gr = rand(shape, seed=10), rand(shape, seed=11)
    xg, rg, wg = _leaves(x, residual, w)
    normed, res_out = add_rms_norm(xg, rg, wg, EPS, residual_in_fp32, backend=backend)
    assert normed.dtype == dtype and res_out.dtype == res_dtype
    (normed.double() * gy + res_out.double() * gr).sum().backward()

    xd, rd, wd = _leaves(x.double(), None if residual is None else residual.double(), w.double())
    total = xd if rd is None else xd + rd
    want = rms_def(total, wd, EPS)
    (want * gy + total * gr).sum().backward()
    _compare(normed, want.detach(), dtype)
    _compare(res_out, total.detach(), res_dtype, "residual_out")
    with torch.inference_mode():
        normed_ng, res_ng = add_rms_norm(x, residual, w, EPS, residual_in_fp32, backend=backend)
    _compare(normed_ng, want.detach(), dtype, "no grad")
    _compare(res_ng, total.detach(), res_dtype, "no grad residual_out")
    _compare(xg.grad, xd.grad, dtype, "x.grad")
    if has_residual:
        # its gradient flows back through the normed output, rounded to x's dtype
        _compare(rg.grad, rd.grad, res_dtype, "residual.grad", tol_dtype=dtype)
    torch.testing.assert_close(wg.grad.double(), wd.grad, rtol=TOL[dtype][0], atol=TOL[dtype][1] * 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    x, z, r = (rand((2, 6), torch.float64, seed=s).requires_grad_() for s in (1, 2, 3))
    w = (rand((6,), torch.float64, seed=4) + 1).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, 1e-3, backend=backend), (x, w))
    for nbg in (False, True):
        fn = lambda x, z, w, nbg=nbg: gated_rms_norm(x, z, w, 1e-3, 3, nbg, backend=backend)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, z, w))
    fn = lambda x, r, w: add_rms_norm(x, r, w, 1e-3, False, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, r, w))


def test_no_grad_path_leaves_inputs_alone():
    x, z, r, w = rand((3, 16), seed=1), rand((3, 16), seed=2), rand((3, 16), seed=3), rand((16,), seed=4)
    copies = [t.clone() for t in (x, z, r, w)]
    for backend in BACKENDS:
        with torch.no_grad():
            rms_norm(x, w, backend=backend)
            gated_rms_norm(x, z, w, EPS, 8, True, backend=backend)
            gated_rms_norm(x, z, w, EPS, 8, False, backend=backend)
            add_rms_norm(x, r, w, EPS, True, backend=backend)
            add_rms_norm(x, None, w, EPS, False, backend=backend)
        for t, c in zip((x, z, r, w), copies):
            assert torch.equal(t, c)


def test_eps_is_used():
    x, w = torch.full((1, 4), 1e-3), torch.ones(4)
    for backend in BACKENDS:
        torch.testing.assert_close(rms_norm(x, w, 1.0, backend=backend), x / (1e-6 + 1.0) ** 0.5)
        with torch.no_grad():
            torch.testing.assert_close(rms_norm(x, w, 1.0, backend=backend), x / (1e-6 + 1.0) ** 0.5)


def test_bad_arguments_name_the_argument():
    x, z, w = rand((2, 8)), rand((2, 8)), rand((8,))
    for eps in (0.0, -1e-5, "1e-5"):
        with pytest.raises(ValueError, match="eps"):
            rms_norm(x, w, eps)
        with pytest.raises(ValueError, match="eps"):
            gated_rms_norm(x, z, w, eps)
        with pytest.raises(ValueError, match="eps"):
            add_rms_norm(x, None, w, eps)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, w[:7])
    with pytest.raises(TypeError, match="x"):
        rms_norm(x.numpy(), w)
    with pytest.raises(TypeError, match="x"):
        rms_norm(x.long(), w)
    for group_size in (3, 0, -4):
        with pytest.raises(ValueError, match="group_size"):
            gated_rms_norm(x, z, w, group_size=group_size)
    with pytest.raises(ValueError, match="z"):
        gated_rms_norm(x, z[:, :4], w)
    with pytest.raises(ValueError, match="residual"):
        add_rms_norm(x, x[:1], w)
    with pytest.raises(ValueError, match="backend"):
        rms_norm(x, w, backend="fastest")
