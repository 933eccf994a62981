"""Tests of causal_conv1d and causal_conv1d_update: the reference against a per-position definition,
the torch backend against the reference (forward and gradients of every input), packing, chaining,
stepping, float64 gradcheck and argument errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mambakit.ops import causal_conv1d, causal_conv1d_update

BACKENDS = ("reference", "torch")
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-2, 1e-2), torch.float16: (2e-3, 2e-3)}


def make_inputs(batch, seqlen, dim, width, dtype=torch.float32, bias=True, state=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seqlen, dim, generator=g).to(dtype)
    weight = torch.randn(dim, width, generator=g) / width**0.5
    b = torch.randn(dim, generator=g) if bias else None
    s = torch.randn(batch, dim, width - 1, generator=g).to(dtype) if state else None
    return x, weight, b, s


def random_seq_idx(batch, seqlen, ndocs, seed=0):
    """(batch, seqlen) non-decreasing ids with up to `ndocs` documents a row, ids not starting at 0."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        cuts = torch.randint(1, seqlen + 1, (ndocs - 1,), generator=g) if seqlen > 1 else torch.tensor([])
        starts = torch.zeros(seqlen, dtype=torch.int64)
        for c in cuts.tolist():
            if c < seqlen:
                starts[c] = 1
        rows.append(7 + torch.cumsum(starts, 0))
    return torch.stack(rows).to(torch.int32)


def definition(x, weight, bias, activation, initial_state, seq_idx):
    """The docstring read literally, one output and one tap at a time, in float64."""
    batch, seqlen, dim = x.shape
    width = weight.shape[1]
    x, weight = x.double(), weight.double()
    out = torch.zeros(batch, seqlen, dim, dtype=torch.float64)
    final = torch.zeros(batch, dim, width - 1, dtype=torch.float64)

    def read(b, src, doc_of_reader):
        if src >= 0:
            same = seq_idx is None or int(seq_idx[b, src]) == doc_of_reader
            return x[b, src] if same else torch.zeros(dim, dtype=torch.float64)
        first_doc = seq_idx is None or doc_of_reader == int(seq_idx[b, 0])
        if initial_state is None or not first_doc:
            return torch.zeros(dim, dtype=torch.float64)
        return initial_state[b, :, width - 1 + src].double()

    for b in range(batch):
        for t in range(seqlen):
            doc = None if seq_idx is None else int(seq_idx[b, t])
            acc = torch.zeros(dim, dtype=torch.float64) if bias is None else bias.double().clone()
            for k in range(width):
                acc = acc + weight[:, k] * read(b, t - width + 1 + k, doc)
            out[b, t] = torch.nn.functional.silu(acc) if activation == "silu" else acc
        last_doc = None if seq_idx is None else int(seq_idx[b, -1])
        for j in range(width - 1):
            final[b, :, j] = read(b, seqlen - width + 1 + j, last_doc)
    return out, final


SHAPES = [  # batch, seqlen, dim, width
    (1, 1, 3, 1),
    (2, 1, 5, 4),
    (2, 2, 7, 4),
    (1, 5, 6, 2),
    (3, 9, 10, 3),
    (2, 17, 12, 4),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("packed", [False, True])
def test_matches_definition(backend, shape, packed):
    batch, seqlen, dim, width = shape
    x, weight, bias, state = make_inputs(*shape, seed=seqlen)
    seq_idx = random_seq_idx(batch, seqlen, 3, seed=dim) if packed else None
    out, final = causal_conv1d(x, weight, bias, "silu", state, True, seq_idx, backend=backend)
    want_out, want_final = definition(x, weight, bias, "silu", state, seq_idx)
    assert out.dtype == x.dtype and final.dtype == x.dtype
    assert torch.isfinite(out).all() and torch.isfinite(final).all()
    torch.testing.assert_close(out.double(), want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final.double(), want_final, rtol=1e-5, atol=1e-5)


def test_definition_by_hand():
    # width 2, weight [a, b]: out_t = a * x_{t-1} + b * x_t; a document boundary reads x_{t-1} as zero
    x = torch.tensor([[[1.0], [2.0], [3.0]]])
    weight = torch.tensor([[10.0, 1.0]])
    state = torch.tensor([[[5.0]]])
    seq_idx = torch.tensor([[0, 0, 1]])
    for backend in BACKENDS:
        out, final = causal_conv1d(x, weight, None, None, state, True, seq_idx, backend=backend)
        assert out.flatten().tolist() == [51.0, 12.0, 3.0]
        assert final.flatten().tolist() == [3.0]


def _grads(backend, x, weight, bias, state, activation, seq_idx, gy, gf):
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias, state)]
    out, final = causal_conv1d(*leaves[:2], leaves[2], activation, leaves[3], True, seq_idx, backend=backend)
    (out.float() * gy).sum().add((final.float() * gf).sum()).backward()
    return out, final, [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_torch_matches_reference_fwd_bwd(dtype, shape, packed, activation):
    batch, seqlen, dim, width = shape
    x, weight, bias, state = make_inputs(*shape, dtype=dtype, seed=3 * seqlen + width)
    seq_idx = random_seq_idx(batch, seqlen, 2, seed=seqlen) if packed else None
    gy = torch.randn(batch, seqlen, dim)
    gf = torch.randn(batch, dim, width - 1)
    ref = _grads("reference", x, weight, bias, state, activation, seq_idx, gy, gf)
    got = _grads("torch", x, weight, bias, state, activation, seq_idx, gy, gf)
    rtol, atol = TOL[dtype]
    for r, g in zip(ref[:2], got[:2]):
        assert g.dtype == dtype and torch.isfinite(g).all()
        torch.testing.assert_close(g, r, rtol=rtol, atol=atol)
    for name, r, g in zip(("x", "weight", "bias", "initial_state"), ref[2], got[2]):
        assert g is not None and torch.isfinite(g).all(), name
        # weight and bias gradients sum over batch * seqlen terms
        scale = max(1.0, (batch * seqlen) ** 0.5) if name in ("weight", "bias") else 1.0
        torch.testing.assert_close(g.float(), r.float(), rtol=rtol, atol=atol * scale, msg=name)


@given(
    batch=st.integers(1, 3),
    seqlen=st.integers(1, 40),
    dim=st.integers(1, 19),
    width=st.integers(1, 4),
    ndocs=st.integers(1, 5),
    bias=st.booleans(),
    state=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_torch_matches_reference_random_shapes(batch, seqlen, dim, width, ndocs, bias, state, seed):
    x, weight, b, s = make_inputs(batch, seqlen, dim, width, bias=bias, state=state, seed=seed)
    seq_idx = random_seq_idx(batch, seqlen, ndocs, seed=seed) if ndocs > 1 else None
    ref = causal_conv1d(x, weight, b, "silu", s, True, seq_idx, backend="reference")
    got = causal_conv1d(x, weight, b, "silu", s, True, seq_idx, backend="torch")
    for r, g in zip(ref, got):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("width", [1, 2, 4])
def test_packing_equals_separate_sequences(backend, width):
    lengths = [1, 4, 2, 6] if width > 1 else [3, 1, 5]
    dim = 5
    x, weight, bias, state = make_inputs(1, sum(lengths), dim, width, seed=width)
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    out, final = causal_conv1d(x, weight, bias, "silu", state, True, seq_idx, backend=backend)
    start = 0
    for i, n in enumerate(lengths):
        init = state if i == 0 else None  # initial_state feeds only the first document
        o, f = causal_conv1d(x[:, start : start + n], weight, bias, "silu", init, True, backend=backend)
        torch.testing.assert_close(out[:, start : start + n], o, rtol=1e-6, atol=1e-6)
        start += n
    torch.testing.assert_close(final, f, rtol=0, atol=0)  # the state of the last document


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("split", [1, 2, 5, 11])
@pytest.mark.parametrize("width", [1, 3, 4])
def test_chaining_equals_one_forward(backend, split, width):
    x, weight, bias, state = make_inputs(2, 12, 6, width, seed=split)
    out, final = causal_conv1d(x, weight, bias, "silu", state, True, backend=backend)
    o1, f1 = causal_conv1d(x[:, :split], weight, bias, "silu", state, True, backend=backend)
    o2, f2 = causal_conv1d(x[:, split:], weight, bias, "silu", f1, True, backend=backend)
    torch.testing.assert_close(torch.cat([o1, o2], 1), out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(f2, final, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_update_steps_equal_full_conv(backend, width, dtype):
    x, weight, bias, state = make_inputs(3, 7, 9, width, dtype=dtype, seed=width)
    out, final = causal_conv1d(x, weight, bias, "silu", state, True, backend="reference")
    conv_state = state.clone()
    steps = [
        causal_conv1d_update(x[:, t], conv_state, weight, bias, "silu", backend=backend)
        for t in range(x.shape[1])
    ]
    got = torch.stack(steps, 1)
    assert got.dtype == dtype and torch.isfinite(got).all()
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got, out, rtol=rtol, atol=atol)
    torch.testing.assert_close(conv_state, final, rtol=0, atol=0)


def test_update_keeps_float32_state_with_half_input():
    x, weight, bias, _ = make_inputs(2, 3, 4, 4, dtype=torch.bfloat16)
    conv_state = torch.randn(2, 4, 3)
    before = conv_state.clone()
    out = causal_conv1d_update(x[:, 0], conv_state, weight, bias, None)
    assert out.dtype == torch.bfloat16 and conv_state.dtype == torch.float32
    torch.testing.assert_close(conv_state[:, :, :2], before[:, :, 1:], rtol=0, atol=0)
    torch.testing.assert_close(conv_state[:, :, 2], x[:, 0].float(), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("packed", [False, True])
def test_gradcheck_float64(backend, packed):
    x, weight, bias, state = (t.double().requires_grad_() for t in make_inputs(2, 5, 3, 3, seed=1))
    seq_idx = torch.tensor([[0, 0, 1, 1, 1], [2, 3, 3, 3, 4]]) if packed else None

    def f(x, weight, bias, state):
        return causal_conv1d(x, weight, bias, "silu", state, True, seq_idx, backend=backend)

    assert torch.autograd.gradcheck(f, (x, weight, bias, state))


def test_update_gradcheck_float64():
    x, weight, bias, state = (t.double() for t in make_inputs(2, 1, 3, 4, seed=2))
    x, weight, bias = (t.requires_grad_() for t in (x, weight, bias))

    def f(x, weight, bias):
        return causal_conv1d_update(x[:, 0], state.clone(), weight, bias, "silu", backend="torch")

    assert torch.autograd.gradcheck(f, (x, weight, bias))


def test_bad_arguments_name_the_argument():
    x, weight, bias, state = make_inputs(2, 5, 4, 3)
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, weight, activation="relu")
    with pytest.raises(ValueError, match="x"):
        causal_conv1d(x[0], weight)
    with pytest.raises(ValueError, match="weight"):
        causal_conv1d(x, weight[:3])
    with pytest.raises(ValueError, match="weight"):
        causal_conv1d(x, weight[:, :0])
    with pytest.raises(ValueError, match="bias"):
        causal_conv1d(x, weight, bias[:2])
    with pytest.raises(ValueError, match="initial_state"):
        causal_conv1d(x, weight, initial_state=state[:, :, :1])
    with pytest.raises(ValueError, match="seq_idx"):
        causal_conv1d(x, weight, seq_idx=torch.tensor([[0, 1, 0, 1, 1]] * 2))
    with pytest.raises(TypeError, match="seq_idx"):
        causal_conv1d(x, weight, seq_idx=torch.zeros(2, 5))
    with pytest.raises(TypeError, match="weight"):
        causal_conv1d(x, weight.numpy())
    with pytest.raises(ValueError, match="conv_state"):
        causal_conv1d_update(x[:, 0], state[:, :, :1], weight)
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d_update(x[:, 0], state, weight, activation="gelu")
    with pytest.raises(ValueError, match="backend"):
        causal_conv1d(x, weight, backend="cuda")
