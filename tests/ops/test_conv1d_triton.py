"""Triton conv1d kernels against the reference: forward, backward, states, seq_idx and the one-token step.

On CPU the kernels run through Triton's interpreter (tests/conftest.py), so shapes stay tiny and odd
(block edges, seqlen shorter than the width); the `gpu` tests repeat the check at model sizes.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mambakit.ops import causal_conv1d, causal_conv1d_update

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _inputs(batch, seqlen, dim, width, dtype, bias, init, seq, seed, state_dtype=None):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=g).to(device=DEV, dtype=dt).requires_grad_()

    x = rnd(batch, seqlen, dim)
    weight = rnd(dim, width, dt=torch.float32)
    b = rnd(dim, dt=torch.float32) if bias else None
    state = rnd(batch, dim, width - 1, dt=state_dtype or dtype) if init else None
    seq_idx = None
    if seq:
        # a few documents per row, starting anywhere (including at position 0 and at the last position)
        seq_idx = torch.sort(torch.randint(0, 4, (batch, seqlen), generator=g), dim=1).values.to(DEV)
    return x, weight, b, state, seq_idx


def _run(backend, x, weight, bias, state, seq_idx, activation):
    return causal_conv1d(x, weight, bias, activation, state, True, seq_idx, backend=backend)


def _check_fwd_bwd(batch, seqlen, dim, width, dtype, bias, init, seq, silu, seed=0, state_dtype=None):
    x, w, b, state, seq_idx = _inputs(batch, seqlen, dim, width, dtype, bias, init, seq, seed, state_dtype)
    act = "silu" if silu else None
    out, final = _run("triton", x, w, b, state, seq_idx, act)
    ref_out, ref_final = _run("reference", x, w, b, state, seq_idx, act)
    assert out.dtype == x.dtype and final.dtype == x.dtype and out.shape == x.shape
    assert torch.isfinite(out).all() and torch.isfinite(final).all()
    tol = TOL[dtype]
    torch.testing.assert_close(out, ref_out, **tol)
    torch.testing.assert_close(final, ref_final, **tol)

    gen = torch.Generator().manual_seed(seed + 1)
    dout = torch.randn(out.shape, generator=gen).to(DEV, dtype)
    dfinal = torch.randn(final.shape, generator=gen).to(DEV, dtype)
    inputs = [t for t in (x, w, b, state) if t is not None]
    grads = torch.autograd.grad((out * dout).float().sum() + (final * dfinal).float().sum(), inputs)
    ref = torch.autograd.grad((ref_out * dout).float().sum() + (ref_final * dfinal).float().sum(), inputs)
    for t, g, r in zip(inputs, grads, ref):
        assert g.dtype == t.dtype and g.shape == t.shape
        assert torch.isfinite(g).all()
        # weight/bias gradients sum over batch * seqlen terms: scale the tolerance with the sum
        scale = 1.0 if t is x or t is state else max(1.0, (batch * seqlen) ** 0.5)
        torch.testing.assert_close(g, r, atol=tol["atol"] * scale, rtol=tol["rtol"])


CASES = [
    # batch, seqlen, dim, width, bias, init, seq, silu
    (2, 37, 70, 4, True, True, True, True),
    (1, 37, 24, 4, False, False, False, False),
    (2, 1, 5, 4, True, True, False, True),
    (1, 3, 5, 4, False, True, True, False),
    (2, 3, 24, 2, True, False, True, True),
    (1, 37, 5, 3, True, True, False, False),
    (2, 17, 24, 2, False, True, False, True),
    (1, 5, 24, 1, True, False, True, True),
    # widths over 4 take the kernel's other dweight path (a sum over rows per block)
    (1, 37, 24, 5, True, True, True, True),
    (2, 19, 5, 6, False, False, False, True),
]


@pytest.mark.parametrize("batch,seqlen,dim,width,bias,init,seq,silu", CASES)
def test_fwd_bwd_fp32(batch, seqlen, dim, width, bias, init, seq, silu):
    _check_fwd_bwd(batch, seqlen, dim, width, torch.float32, bias, init, seq, silu)


@pytest.mark.parametrize("seq,state_dtype", [(False, torch.bfloat16), (True, torch.float32)])
def test_fwd_bwd_bf16(seq, state_dtype):
    # the conv state often lives in float32 while activations are bf16
    _check_fwd_bwd(2, 21, 24, 4, torch.bfloat16, True, True, seq, True, seed=3, state_dtype=state_dtype)


@settings(max_examples=6)
@given(
    batch=st.integers(1, 2),
    seqlen=st.integers(1, 40),
    dim=st.integers(1, 40),
    width=st.integers(2, 4),
    flags=st.tuples(*[st.booleans()] * 4),
    seed=st.integers(0, 2**16),
)
def test_fwd_bwd_random_shapes(batch, seqlen, dim, width, flags, seed):
    _check_fwd_bwd(batch, seqlen, dim, width, torch.float32, *flags, seed=seed)


def test_gradcheck_float64():
    x, w, b, state, seq_idx = _inputs(1, 4, 2, 3, torch.float64, True, True, True, seed=7)
    w, b = w.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    seq_idx = torch.tensor([[0, 0, 1, 1]], device=DEV)  # a boundary inside the row, state in doc 0

    def f(x, w, b, state):
        return causal_conv1d(x, w, b, "silu", state, True, seq_idx, backend="triton")

    # fast mode checks random projections of the Jacobian: a few interpreted launches instead of dozens
    assert torch.autograd.gradcheck(f, (x, w, b, state), eps=1e-6, atol=1e-5, fast_mode=True)


def test_noncontiguous_input():
    # Mamba slices x out of a wider projection: the kernels take strides, not contiguous copies
    g = torch.Generator().manual_seed(5)
    wide = torch.randn(2, 19, 50, generator=g).to(DEV)
    x = wide[:, :, 7:37]
    w = torch.randn(30, 4, generator=g).to(DEV)
    state = torch.randn(2, 3, 30, generator=g).to(DEV).transpose(1, 2)
    out, final = causal_conv1d(x, w, None, "silu", state, True, backend="triton")
    ref_out, ref_final = causal_conv1d(x, w, None, "silu", state, True, backend="reference")
    torch.testing.assert_close(out, ref_out, **TOL[torch.float32])
    torch.testing.assert_close(final, ref_final, **TOL[torch.float32])


@pytest.mark.parametrize("width", [2, 4])
def test_update_loop_equals_full_conv(width):
    batch, seqlen, dim = 2, 7, 24
    x, w, b, state, _ = _inputs(batch, seqlen, dim, width, torch.float32, True, True, False, seed=11)
    x, w, b, state = (t.detach() for t in (x, w, b, state))
    full, final = causal_conv1d(x, w, b, "silu", state, True, backend="reference")
    conv_state = state.clone()
    ref_state = state.clone()
    for t in range(seqlen):
        y = causal_conv1d_update(x[:, t], conv_state, w, b, "silu", backend="triton")
        y_ref = causal_conv1d_update(x[:, t], ref_state, w, b, "silu", backend="reference")
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y, full[:, t], **TOL[torch.float32])
        torch.testing.assert_close(y, y_ref, **TOL[torch.float32])
        torch.testing.assert_close(conv_state, ref_state, **TOL[torch.float32])
    torch.testing.assert_close(conv_state, final, **TOL[torch.float32])


def test_update_bf16_state_fp32():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 40, generator=g).to(DEV, torch.bfloat16)
    w = torch.randn(40, 4, generator=g).to(DEV)
    state = torch.randn(3, 40, 3, generator=g).to(DEV)
    s1, s2 = state.clone(), state.clone()
    y = causal_conv1d_update(x, s1, w, None, None, backend="triton")
    y_ref = causal_conv1d_update(x, s2, w, None, None, backend="reference")
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref, **TOL[torch.bfloat16])
    torch.testing.assert_close(s1, s2)


def test_opcheck_and_compile():
    x, w, b, state, seq_idx = _inputs(1, 6, 5, 3, torch.float32, True, True, True, seed=4)
    from mambakit.ops.conv1d.triton import causal_conv1d_impl

    torch.library.opcheck(torch.ops.mambakit.causal_conv1d_fwd, (x, w, b, True, state, True, seq_idx))

    def f(x, w, b, state):
        # the backend's impl, not the public entry: the entry's argument checks and lazy import are
        # Python that fullgraph tracing does not take (the ops themselves are what must trace)
        out, final = causal_conv1d_impl(x, w, b, "silu", state, True, seq_idx)
        return out.square().sum() + final.sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    loss = compiled(x, w, b, state)
    grads = torch.autograd.grad(loss, (x, w, b, state))
    ref_grads = torch.autograd.grad(f(x, w, b, state), (x, w, b, state))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_bad_arguments_name_the_argument():
    x = torch.randn(1, 4, 6, device=DEV)
    w = torch.randn(6, 3, device=DEV)
    with pytest.raises(ValueError, match="initial_state"):
        causal_conv1d(x, w, initial_state=torch.zeros(1, 6, 3, device=DEV), backend="triton")
    with pytest.raises(ValueError, match="conv_state"):
        causal_conv1d_update(x[:, 0], torch.zeros(1, 6, 3, device=DEV), w, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("seq", [False, True])
def test_model_size_bf16_gpu(seq):
    _check_fwd_bwd(2, 2048, 1536, 4, torch.bfloat16, True, True, seq, True, seed=9)
