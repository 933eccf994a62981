"""Selective scan (Mamba-1, S6): the chunked torch backend against the sequential reference.

Forward values, final states and the gradients of every input, across shapes, chunkings, options and
dtypes; packed sequences, chaining through states, the one-token step, float64 gradcheck and input errors.
The reference runs in float64 on upcast copies of the inputs, so it is the precise answer.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mambakit.ops import selective_scan, selective_state_update

# Submodules by import path: the package's `torch` attribute is the torch library until the backend loads.
ref = importlib.import_module("mambakit.ops.selective_scan.reference")
fast = importlib.import_module("mambakit.ops.selective_scan.torch")

KEYS = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")


def make_inputs(
    batch, seqlen, dim, dstate, ngroups, *, seed=0, dtype=torch.float32, D=True, z=True, bias=True, init=True
):
    """Inputs on the scales of a trained layer: A in [-16, -1], delta ~ 0.01..0.5 after softplus."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    inp = {
        "x": rnd(batch, seqlen, dim).to(dtype),
        "dt": (rnd(batch, seqlen, dim) * 0.5 - 2.0).to(dtype),
        "A": -torch.exp(torch.rand(dim, dstate, generator=g) * math.log(16.0)),
        "B": rnd(batch, seqlen, ngroups, dstate).to(dtype),
        "C": rnd(batch, seqlen, ngroups, dstate).to(dtype),
        "D": rnd(dim) if D else None,
        "z": rnd(batch, seqlen, dim).to(dtype) if z else None,
        "dt_bias": torch.rand(dim, generator=g) * 0.5 if bias else None,
        "initial_state": rnd(batch, dim, dstate) if init else None,
    }
    return inp


def upcast(inp):
    return {k: None if v is None else v.double() for k, v in inp.items()}


def run(impl, inp, softplus=True, seq_idx=None, **kw):
    return impl.selective_scan_impl(
        *(inp[k] for k in KEYS[:8]), softplus, inp["initial_state"], True, seq_idx, **kw
    )


def run_with_grads(impl, inp, gy, gh, softplus=True, seq_idx=None, **kw):
    """y, final state and d(loss)/d(input) for loss = <y, gy> + <h, gh>, for every input given."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inp.items() if v is not None}
    y, h = run(impl, {k: leaves.get(k) for k in KEYS}, softplus, seq_idx, **kw)
    loss = (y.double() * gy).sum() + (h.double() * gh).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return y.detach(), h.detach(), dict(zip(leaves, grads))


def assert_close(actual, expected, tol, what, scale=None):
    """max |actual - expected| <= tol * scale, scale max |expected| (at least 1e-3) unless given (and
    no NaN / inf anywhere)."""
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    assert torch.isfinite(expected).all(), f"{what}: non-finite reference"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = (actual.double() - expected.double()).abs().max().item()
    if scale is None:
        scale = max(expected.double().abs().max().item(), 1e-3)
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} * {scale:.3g}"


def compare(inp, tol, grad_tol, softplus=True, seq_idx=None, seed=1, **kw):
    """torch backend on `inp` against the reference in float64, values and gradients."""
    batch, seqlen, dim = inp["x"].shape
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(batch, seqlen, dim, generator=g, dtype=torch.float64)
    gh = torch.randn(batch, dim, inp["A"].shape[1], generator=g, dtype=torch.float64)
    y, h, grads = run_with_grads(fast, inp, gy, gh, softplus, seq_idx, **kw)
    y_ref, h_ref, grads_ref = run_with_grads(ref, upcast(inp), gy, gh, softplus, seq_idx)
    assert y.dtype == inp["x"].dtype
    assert h.dtype == (torch.float64 if inp["x"].dtype == torch.float64 else torch.float32)
    assert_close(y, y_ref, tol, "y")
    assert_close(h, h_ref, tol, "final state")
    # The forward-only path (no autograd) is separate code: same answer.
    chunk = kw.get("chunk_size", fast.FORWARD_CHUNK)
    with torch.no_grad():
        y_ng, h_ng = run(fast, inp, softplus, seq_idx, forward_chunk=chunk)
    assert_close(y_ng, y_ref, tol, "y without autograd")
    assert_close(h_ng, h_ref, tol, "final state without autograd")
    assert set(grads) == set(grads_ref)
    for k in grads:
        assert grads[k].dtype == inp[k].dtype
        scale = None
        if k == "dt_bias":
            # d dt_bias = sum over (batch, seqlen) of d dt: its rounding error follows the size of the
            # terms, which can cancel to a far smaller sum (a hypothesis-found packed case: terms 2.6 in
            # all, sum 0.0064, fp32 error 1.5e-7)
            scale = max(grads_ref["dt"].abs().sum((0, 1)).max().item(), 1e-3)
        assert_close(grads[k], grads_ref[k], grad_tol, f"grad of {k}", scale)


SHAPES = [
    # batch, seqlen, dim, dstate, ngroups, chunk_size
    (1, 1, 4, 3, 1, 32),  # one step
    (2, 7, 6, 4, 2, 32),  # shorter than a chunk
    (1, 37, 8, 4, 1, 8),  # several chunks, last one partial
    (3, 64, 8, 5, 4, 8),  # whole chunks, ngroups = dim / 2
    (2, 50, 12, 4, 3, 4),  # many small chunks
    (1, 40, 6, 2, 1, 1),  # chunk of one step
    (2, 100, 16, 8, 2, fast.CHUNK),  # defaults, several chunks
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}_l{}_d{}_n{}_g{}_c{}".format(*s))
@pytest.mark.parametrize("options", ["all", "none"])
def test_fp32_matches_reference(shape, options):
    batch, seqlen, dim, dstate, ngroups, chunk = shape
    on = options == "all"
    inp = make_inputs(batch, seqlen, dim, dstate, ngroups, D=on, z=on, bias=on, init=on)
    # Without softplus dt must be a positive step size itself.
    if not on:
        inp["dt"] = inp["dt"].exp()
    compare(inp, 1e-5, 1e-5, softplus=on, chunk_size=chunk)


@given(
    batch=st.integers(1, 3),
    seqlen=st.integers(1, 45),
    group_size=st.integers(1, 4),
    ngroups=st.integers(1, 3),
    dstate=st.integers(1, 6),
    chunk=st.integers(1, 12),
    flags=st.lists(st.booleans(), min_size=5, max_size=5),
    packed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fp32_matches_reference_random(
    batch, seqlen, group_size, ngroups, dstate, chunk, flags, packed, seed
):
    D, z, bias, init, softplus = flags
    inp = make_inputs(
        batch, seqlen, group_size * ngroups, dstate, ngroups, seed=seed, D=D, z=z, bias=bias, init=init
    )
    if not softplus:
        inp["dt"] = inp["dt"].exp()
    seq_idx = None
    if packed:
        g = torch.Generator().manual_seed(seed)
        seq_idx = torch.cumsum(torch.rand(batch, seqlen, generator=g) < 0.15, dim=1)
    compare(inp, 1e-5, 1e-5, softplus, seq_idx, seed=seed, chunk_size=chunk)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
def test_low_precision_matches_fp64_reference(dtype, tol):
    inp = make_inputs(2, 45, 8, 4, 2, dtype=dtype, seed=3)
    compare(inp, tol, 4 * tol, chunk_size=8)


def test_float64_inputs_accumulate_in_float64():
    inp = upcast(make_inputs(2, 33, 6, 3, 3, seed=4))
    compare(inp, 1e-12, 1e-11, chunk_size=8)


def test_large_decays_stay_finite():
    """delta * A down to about -300 inside a chunk: exp underflows to 0 but nothing overflows."""
    inp = make_inputs(2, 40, 6, 4, 1, seed=5)
    inp["dt"] = inp["dt"] + 6.0  # softplus(~4..6) * A in [-16, -1] per step
    compare(inp, 1e-5, 1e-5, chunk_size=16)


def test_packed_rows_equal_separate_sequences():
    lengths = [5, 1, 17, 9]
    inp = make_inputs(1, sum(lengths), 8, 4, 2, seed=6, init=False)
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    y, h = run(fast, inp, seq_idx=seq_idx, chunk_size=4)
    start = 0
    for n in lengths:
        part = {k: v[:, start : start + n] if k in ("x", "dt", "B", "C", "z") else v for k, v in inp.items()}
        y_part, h_part = run(fast, part, chunk_size=4)
        assert_close(y[:, start : start + n], y_part, 1e-5, f"document at {start}")
        start += n
    assert_close(h, h_part, 1e-5, "final state of the last document")


def test_initial_state_flows_into_first_document_only():
    inp = make_inputs(1, 12, 4, 3, 1, seed=7)
    seq_idx = torch.tensor([[0] * 5 + [1] * 7])
    y, _ = run(fast, inp, seq_idx=seq_idx, chunk_size=4)
    y_zero, _ = run(fast, {**inp, "initial_state": torch.zeros_like(inp["initial_state"])}, seq_idx=seq_idx)
    assert (y[:, :5] - y_zero[:, :5]).abs().max() > 1e-3  # the state reaches the first document
    assert_close(y[:, 5:], y_zero[:, 5:], 1e-6, "second document")


@pytest.mark.parametrize("split", [1, 13, 16, 31])
def test_chaining_through_final_state(split):
    inp = make_inputs(2, 32, 8, 4, 2, seed=8)
    y, h = run(fast, inp)
    first = {k: v[:, :split] if k in ("x", "dt", "B", "C", "z") else v for k, v in inp.items()}
    y1, h1 = run(fast, first)
    second = {k: v[:, split:] if k in ("x", "dt", "B", "C", "z") else v for k, v in inp.items()}
    y2, h2 = run(fast, {**second, "initial_state": h1})
    assert_close(torch.cat([y1, y2], dim=1), y, 1e-5, "chained y")
    assert_close(h2, h, 1e-5, "chained final state")


def test_recompute_gives_the_same_gradients():
    inp = make_inputs(1, 40, 6, 3, 1, seed=9)
    gy, gh = torch.randn(1, 40, 6, dtype=torch.float64), torch.randn(1, 6, 3, dtype=torch.float64)
    _, _, g1 = run_with_grads(fast, inp, gy, gh, chunk_size=4, recompute=True)
    _, _, g2 = run_with_grads(fast, inp, gy, gh, chunk_size=4, recompute=False)
    for k in g1:
        assert_close(g1[k], g2[k], 1e-6, f"grad of {k}")


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_public_entry_dispatches(backend):
    inp = make_inputs(2, 20, 6, 3, 3, seed=10)
    y, h = selective_scan(**inp, dt_softplus=True, return_final_state=True, backend=backend)
    y_ref, h_ref = run(ref, upcast(inp))
    assert_close(y, y_ref, 1e-5, "y")
    assert_close(h, h_ref, 1e-5, "final state")
    y_only = selective_scan(**inp, dt_softplus=True, backend=backend)
    assert isinstance(y_only, torch.Tensor)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_step_loop_equals_scan(backend):
    inp = make_inputs(2, 9, 8, 4, 2, seed=11)
    y_scan, h_scan = run(ref, upcast(inp))
    state = inp["initial_state"].clone()
    for t in range(9):
        y_t = selective_state_update(
            state,
            inp["x"][:, t],
            inp["dt"][:, t],
            inp["A"],
            inp["B"][:, t],
            inp["C"][:, t],
            D=inp["D"],
            z=inp["z"][:, t],
            dt_bias=inp["dt_bias"],
            dt_softplus=True,
            backend=backend,
        )
        assert y_t.dtype == inp["x"].dtype
        assert_close(y_t, y_scan[:, t], 1e-5, f"step {t}")
    assert_close(state, h_scan, 1e-5, "state after the loop")


def test_step_bf16_activations_keep_fp32_state():
    inp = make_inputs(2, 1, 8, 4, 1, seed=12, dtype=torch.bfloat16)
    state = inp["initial_state"].clone()
    y = fast.selective_state_update_impl(
        state,
        *(inp[k][:, 0] if k in ("x", "dt", "B", "C") else inp[k] for k in ("x", "dt", "A", "B", "C")),
        inp["D"],
        inp["z"][:, 0],
        inp["dt_bias"],
        True,
    )
    y_ref, h_ref = run(ref, upcast(inp))
    assert y.dtype == torch.bfloat16 and state.dtype == torch.float32
    assert_close(y, y_ref[:, 0], 2e-2, "y")
    assert_close(state, h_ref, 1e-5, "state")


@pytest.mark.parametrize("impl", [ref, fast], ids=["reference", "torch"])
def test_gradcheck_float64(impl):
    inp = upcast(make_inputs(2, 6, 4, 2, 2, seed=13))
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    kw = (
        {
            "chunk_size": 2,
        }
        if impl is fast
        else {}
    )
    names = [k for k in KEYS if inp[k] is not None]

    def f(*args):
        a = dict(zip(names, args))
        y, h = run(impl, a, seq_idx=seq_idx, **kw)
        return y, h

    args = tuple(inp[k].requires_grad_() for k in names)
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6)


def _valid():
    return make_inputs(2, 5, 4, 3, 2, seed=14)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"x": torch.randn(2, 5)}, "x"),
        ({"x": torch.ones(2, 5, 4, dtype=torch.int64)}, "x"),
        ({"dt": torch.randn(2, 5, 3)}, "dt"),
        ({"A": torch.randn(4)}, "A"),
        ({"A": torch.randn(5, 3)}, "A"),
        ({"B": torch.randn(2, 5, 3, 3)}, "ngroups"),
        ({"B": torch.randn(2, 5, 2, 4)}, "B"),
        ({"C": torch.randn(2, 5, 1, 3)}, "C"),
        ({"D": torch.randn(3)}, "D"),
        ({"z": torch.randn(2, 4, 4)}, "z"),
        ({"dt_bias": torch.randn(4, 1)}, "dt_bias"),
        ({"initial_state": torch.randn(2, 4, 2)}, "initial_state"),
        ({"x": [[0.0]]}, "x"),
    ],
)
def test_bad_inputs_name_the_argument(change, match):
    inp = {**_valid(), **change}
    with pytest.raises((ValueError, TypeError), match=match):
        selective_scan(**inp, backend="torch")


def test_bad_seq_idx():
    inp = _valid()
    with pytest.raises(ValueError, match="seq_idx"):
        selective_scan(**inp, seq_idx=torch.tensor([[0, 1, 1, 0, 2], [0, 0, 0, 0, 0]]), backend="torch")
    with pytest.raises(TypeError, match="seq_idx"):
        selective_scan(**inp, seq_idx=torch.zeros(2, 5), backend="torch")
    with pytest.raises(ValueError, match="seq_idx"):
        selective_scan(**inp, seq_idx=torch.zeros(2, 4, dtype=torch.int64), backend="torch")


def test_bad_step_inputs():
    inp = _valid()
    state = torch.zeros(2, 4, 3)
    args = [inp["x"][:, 0], inp["dt"][:, 0], inp["A"], inp["B"][:, 0], inp["C"][:, 0]]
    with pytest.raises(TypeError, match="state"):
        selective_state_update(state.int(), *args, backend="torch")  # bf16/fp16 states are allowed
    with pytest.raises(ValueError, match="x"):
        selective_state_update(state, inp["x"], *args[1:], backend="torch")
    with pytest.raises(ValueError, match="ngroups"):
        selective_state_update(state, *args[:3], torch.randn(2, 3, 3), args[4], backend="torch")
    with pytest.raises(ValueError, match="backend"):
        selective_state_update(state, *args, backend="cuda")
