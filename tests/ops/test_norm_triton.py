"""Triton norm kernels against the reference: RMSNorm, gated grouped RMSNorm, residual-add + RMSNorm.

Forward and the gradients of every input (x, z, residual, weight, and the residual output's own
gradient). On CPU the kernels run through Triton's interpreter, so shapes stay tiny and odd.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mambakit.ops import add_rms_norm, gated_rms_norm, rms_norm

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}


def _rand(shape, dtype, g, scale=1.0):
    return (scale * torch.randn(shape, generator=g)).to(DEV, dtype).requires_grad_()


def _compare(fn, inputs, dtype, seed=0):
    """Run `fn(backend, *inputs)` through Triton and the reference; compare outputs and gradients."""
    outs = fn("triton", *inputs)
    refs = fn("reference", *inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    refs = refs if isinstance(refs, tuple) else (refs,)
    tol = TOL[dtype]
    for o, r in zip(outs, refs):
        assert o.dtype == r.dtype and o.shape == r.shape
        assert torch.isfinite(o).all()
        torch.testing.assert_close(o, r, **tol)
    g = torch.Generator().manual_seed(seed + 1)
    douts = [torch.randn(o.shape, generator=g).to(DEV, o.dtype) for o in outs]
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(sum((o * d).float().sum() for o, d in zip(outs, douts)), leaves)
    ref_grads = torch.autograd.grad(sum((o * d).float().sum() for o, d in zip(refs, douts)), leaves)
    n_rows = inputs[0].numel() // inputs[0].shape[-1]
    for t, a, b in zip(leaves, grads, ref_grads):
        assert a.dtype == t.dtype and torch.isfinite(a).all()
        # the weight gradient sums over rows: scale its tolerance with the sum's length
        scale = max(1.0, n_rows**0.5) if t.ndim == 1 else 1.0
        torch.testing.assert_close(a, b, atol=tol["atol"] * scale, rtol=tol["rtol"])


def _rms(backend, x, w):
    return rms_norm(x, w, 1e-5, backend=backend)


def _gated(group, nbg):
    def f(backend, x, z, w):
        return gated_rms_norm(x, z, w, 1e-5, group, nbg, backend=backend)

    return f


def _add(fp32):
    def f(backend, x, r, w):
        return add_rms_norm(x, r, w, 1e-5, fp32, backend=backend)

    return f


@pytest.mark.parametrize("shape", [(1, 5), (3, 24), (2, 7, 70), (37, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm(shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    x, w = _rand(shape, dtype, g, 3.0), _rand(shape[-1:], torch.float32, g)
    _compare(_rms, (x, w), dtype)


@pytest.mark.parametrize("group", [None, 10, 5, 35])
@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_gated_rms_norm(group, norm_before_gate):
    g = torch.Generator().manual_seed(7)
    shape = (2, 9, 70)
    x, z, w = (
        _rand(shape, torch.float32, g),
        _rand(shape, torch.float32, g, 2.0),
        _rand((70,), torch.float32, g),
    )
    _compare(_gated(group, norm_before_gate), (x, z, w), torch.float32)


def test_gated_rms_norm_bf16():
    g = torch.Generator().manual_seed(8)
    x, z = _rand((3, 5, 48), torch.bfloat16, g), _rand((3, 5, 48), torch.bfloat16, g)
    _compare(_gated(24, False), (x, z, _rand((48,), torch.float32, g)), torch.bfloat16)


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("residual_in_fp32", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm(with_residual, residual_in_fp32, dtype):
    g = torch.Generator().manual_seed(3)
    x = _rand((2, 11, 24), dtype, g)
    # the residual stream is often float32 while x is half: mixed dtypes must work
    r = _rand((2, 11, 24), torch.float32 if residual_in_fp32 else dtype, g) if with_residual else None
    w = _rand((24,), torch.float32, g)
    normed, res = add_rms_norm(x, r, w, 1e-5, residual_in_fp32, backend="triton")
    assert res.dtype == (torch.float32 if residual_in_fp32 else dtype)
    _compare(_add(residual_in_fp32), (x, r, w), dtype)


@settings(max_examples=8)
@given(
    lead=st.lists(st.integers(1, 6), min_size=1, max_size=2),
    ngroups=st.integers(1, 4),
    group=st.integers(1, 40),
    norm_before_gate=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_gated_random_shapes(lead, ngroups, group, norm_before_gate, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (*lead, ngroups * group)
    x, z = _rand(shape, torch.float32, g), _rand(shape, torch.float32, g)
    w = _rand(shape[-1:], torch.float32, g)
    _compare(_gated(group, norm_before_gate), (x, z, w), torch.float32, seed=seed)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    x, z, r = (_rand((2, 6), torch.float64, g) for _ in range(3))
    w = _rand((6,), torch.float64, g)

    def f(x, z, r, w):
        a = gated_rms_norm(x, z, w, 1e-5, 3, False, backend="triton")
        b = gated_rms_norm(x, z, w, 1e-5, 2, True, backend="triton")
        c, res = add_rms_norm(x, r, w, 1e-5, True, backend="triton")
        return a, b, c, res, rms_norm(r, w, 1e-5, backend="triton")

    assert torch.autograd.gradcheck(f, (x, z, r, w), eps=1e-6, atol=1e-6, fast_mode=True)


def test_noncontiguous_rows():
    g = torch.Generator().manual_seed(4)
    wide = torch.randn(4, 6, 50, generator=g).to(DEV)
    x = wide[:, :, 10:34]  # rows with a stride, channels contiguous
    xt = torch.randn(24, 6, generator=g).to(DEV).t()  # channels strided: the launcher copies
    w = torch.randn(24, generator=g).to(DEV)
    for inp in (x, xt):
        torch.testing.assert_close(
            rms_norm(inp, w, backend="triton"), rms_norm(inp, w, backend="reference"), **TOL[torch.float32]
        )


def test_opcheck_and_compile():
    from mambakit.ops.norm.triton import add_rms_norm_impl, gated_rms_norm_impl

    g = torch.Generator().manual_seed(5)
    x, z, r = (_rand((3, 10), torch.float32, g) for _ in range(3))
    w = _rand((10,), torch.float32, g)
    torch.library.opcheck(torch.ops.mambakit.rms_norm_fwd, (x, z, None, w, 1e-5, 5, False, False, False))
    torch.library.opcheck(torch.ops.mambakit.rms_norm_fwd, (x, None, r, w, 1e-5, 10, False, True, True))

    def f(x, z, r, w):
        y, res = add_rms_norm_impl(x, r, w, 1e-5, True)
        return (gated_rms_norm_impl(y, z, w, 1e-5, 5, False) * res).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    grads = torch.autograd.grad(compiled(x, z, r, w), (x, z, r, w))
    ref = torch.autograd.grad(f(x, z, r, w), (x, z, r, w))
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b)


def test_bad_arguments_name_the_argument():
    x = torch.randn(2, 6, device=DEV)
    w = torch.randn(6, device=DEV)
    with pytest.raises(ValueError, match="group_size"):
        gated_rms_norm(x, x, w, group_size=4, backend="triton")
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.randn(5, device=DEV), backend="triton")
    with pytest.raises(ValueError, match="residual"):
        add_rms_norm(x, torch.randn(2, 5, device=DEV), w, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dim,group", [(2048, None), (4096, 512), (5120, 5120)])
def test_model_size_bf16_gpu(dim, group):
    g = torch.Generator().manual_seed(dim)
    x, z = _rand((4, 512, dim), torch.bfloat16, g), _rand((4, 512, dim), torch.bfloat16, g)
    w = _rand((dim,), torch.float32, g)
    _compare(_gated(group, False), (x, z, w), torch.bfloat16)
    _compare(_add(True), (x, _rand((4, 512, dim), torch.float32, g), w), torch.bfloat16)
