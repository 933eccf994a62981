"""Tests of the SSD op: the two references agree, and the chunked torch backend matches the reference.

Forward and backward (every input's gradient), fp32 tight and bf16 loose against a float64 reference
run on the same (upcast) inputs; packing with seq_idx and cu_seqlens, chaining through initial_state,
the one-step update, float64 gradcheck, and bad inputs.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mambakit.ops import ssd, ssd_state_update
from mambakit.ops.ssd.reference import process_dt, ssd_quadratic, ssd_recurrent

F64 = torch.float64
ACTIVATIONS = ("x", "dt", "B", "C", "z")  # in the activation dtype; the rest are float32 parameters
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float64: 1e-10}


def make(b, L, h, p, g, n, *, seed=0, nstates=None, d_per_channel=False, softplus=True):
    """Random float64 inputs; dt is positive when softplus is off so that delta stays a step size."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    def u(*shape):
        return torch.rand(*shape, generator=gen, dtype=F64)

    return {
        "x": r(b, L, h, p),
        "dt": r(b, L, h) * 0.7 if softplus else u(b, L, h) * 0.5 + 0.05,
        "A": -(u(h) * 1.5 + 0.1),
        "B": r(b, L, g, n),
        "C": r(b, L, g, n),
        "D": r(h, p) if d_per_channel else r(h),
        "z": r(b, L, h, p),
        "dt_bias": u(h) * 0.4 - 0.2 if softplus else u(h) * 0.1,
        "initial_state": r(nstates or b, h, p, n),
    }


def run(backend, inputs, dtype, grads=True, seed=1, **kw):
    """ssd on copies of `inputs` cast to `dtype` (activations) / float32 (parameters; float64 stays
    float64). Returns y, final state and the gradient of every input, all in float64."""
    param_dtype = F64 if dtype == F64 else torch.float32
    leaves = {}
    for k, v in inputs.items():
        if v is None:
            leaves[k] = None
            continue
        leaves[k] = v.to(dtype if k in ACTIVATIONS else param_dtype).requires_grad_(grads)
    y, final = ssd(**leaves, return_final_state=True, backend=backend, **kw)
    assert y.dtype == dtype and final.dtype == param_dtype
    out = {"y": y.double(), "final": final.double()}
    if grads:
        gen = torch.Generator().manual_seed(seed)
        gy = torch.randn(y.shape, generator=gen, dtype=F64)
        gf = torch.randn(final.shape, generator=gen, dtype=F64)
        ((y.double() * gy).sum() + (final.double() * gf).sum()).backward()
        out.update({"d" + k: v.grad.double() for k, v in leaves.items() if v is not None})
    return out


def upcast_like(inputs, dtype):
    """The inputs the reference sees: rounded to what the tested backend received, then float64."""
    param_dtype = F64 if dtype == F64 else torch.float32
    return {
        k: None if v is None else v.to(dtype if k in ACTIVATIONS else param_dtype).to(F64)
        for k, v in inputs.items()
    }


def assert_close(actual, expected, tol, name="", floor=1e-3):
    """max |actual - expected| <= tol * max(max |expected|, floor), and actual is finite."""
    assert torch.isfinite(actual).all(), f"{name}: not finite"
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, floor)
    assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol:.1g} * {scale:.3g}"


def assert_all_close(actual, expected, tol, floor=1e-3):
    assert actual.keys() == expected.keys()
    for k in expected:
        assert_close(actual[k], expected[k], tol, k, floor)


# (batch, seqlen, nheads, headdim, ngroups, dstate, chunk_size)
SHAPES = [
    (1, 1, 2, 3, 1, 4, 4),  # seqlen 1
    (2, 7, 4, 3, 2, 5, 4),  # seqlen not a multiple of chunk_size, ngroups > 1, batch > 1
    (1, 16, 2, 4, 1, 3, 4),  # several whole chunks
    (2, 10, 4, 2, 4, 3, 16),  # chunk_size larger than seqlen, ngroups == nheads
    (1, 33, 6, 4, 3, 8, 8),  # many chunks, ragged end
]
OPTIONS = [
    dict(dt_softplus=True),
    dict(dt_softplus=False, d_per_channel=True),
    dict(dt_softplus=True, dt_limit=(0.2, 0.6), no_z=True),  # clamps on both sides
]


def build(shape, opts, seed=0, nstates=None):
    b, L, h, p, g, n, chunk = shape
    inputs = make(
        b, L, h, p, g, n, seed=seed, nstates=nstates,
        d_per_channel=opts.get("d_per_channel", False), softplus=opts["dt_softplus"],
    )  # fmt: skip
    if opts.get("no_z"):
        inputs["z"] = None
    kw = {"chunk_size": chunk, "dt_softplus": opts["dt_softplus"]}
    if "dt_limit" in opts:
        kw["dt_limit"] = opts["dt_limit"]
    return inputs, kw


@pytest.mark.parametrize("with_seq_idx", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_references_agree(shape, with_seq_idx):
    b, L, h, p, g, n, _ = shape
    t = make(b, L, h, p, g, n, seed=3, d_per_channel=True)
    delta = process_dt(t["dt"], t["dt_bias"], True, (0.0, math.inf), F64)
    gen = torch.Generator().manual_seed(4)
    seq_idx = torch.randint(0, 3, (b, L), generator=gen).sort(dim=1).values if with_seq_idx else None
    args = (t["x"], delta, t["A"], t["B"], t["C"], t["D"], t["initial_state"], seq_idx)
    y1, f1 = ssd_recurrent(*args)
    y2, f2 = ssd_quadratic(*args)
    assert_close(y2, y1, 1e-12, "y")
    assert_close(f2, f1, 1e-12, "final")
    # without an initial state both start from zero
    y3, _ = ssd_quadratic(*args[:6], None, seq_idx)
    y4, _ = ssd_recurrent(*args[:6], None, seq_idx)
    assert_close(y3, y4, 1e-12, "y (no initial state)")


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_empty_sequence_passes_the_state_through(backend):
    t = make(2, 0, 4, 3, 2, 5, seed=43)
    del t["z"]
    y, final = ssd(**t, dt_softplus=True, return_final_state=True, backend=backend)
    assert y.shape == (2, 0, 4, 3)
    assert torch.equal(final, t["initial_state"])


@pytest.mark.parametrize("opts", OPTIONS, ids=["softplus", "raw-dt", "dt-limit"])
@pytest.mark.parametrize("shape", SHAPES)
def test_torch_matches_reference_fp32(shape, opts):
    inputs, kw = build(shape, opts, seed=hash(shape) % 1000)
    got = run("torch", inputs, torch.float32, **kw)
    want = run("reference", upcast_like(inputs, torch.float32), F64, **kw)
    assert_all_close(got, want, TOL[torch.float32])


@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[4]])
def test_torch_matches_reference_bf16(shape):
    inputs, kw = build(shape, OPTIONS[0], seed=7)
    got = run("torch", inputs, torch.bfloat16, **kw)
    want = run("reference", upcast_like(inputs, torch.bfloat16), F64, **kw)
    assert_all_close(got, want, TOL[torch.bfloat16])


def test_strong_decay_stays_finite():
    """exp of a large positive segment sum must never be formed (masked entries, padding)."""
    inputs, kw = build((2, 13, 2, 3, 1, 4, 8), OPTIONS[0], seed=11)
    inputs["A"] = torch.tensor([-80.0, -5.0], dtype=F64)
    inputs["dt"] = inputs["dt"] + 4.0
    seq_idx = torch.tensor([[0] * 6 + [1] * 7, [0] * 13])
    got = run("torch", inputs, torch.float32, seq_idx=seq_idx, **kw)
    want = run("reference", upcast_like(inputs, torch.float32), F64, seq_idx=seq_idx, **kw)
    # dA is here a tiny sum (~1e-6) of O(1) terms that cancel; the chunked form takes differences of
    # running sums of delta*A, so its fp32 error is measured against the O(1) scale of the terms
    assert_all_close(got, want, TOL[torch.float32], floor=1.0)


def test_large_steps_forward_matches_reference():
    """Forward only, steps large enough that most decays fall below 2**-100 (the floor that keeps the
    CPU's products off subnormals): still the reference's result to fp32 tolerance."""
    inputs, kw = build((2, 40, 4, 3, 2, 5, 8), OPTIONS[0], seed=12)
    inputs["A"] = -torch.arange(1.0, 5.0, dtype=F64) * 4.0
    inputs["dt"] = inputs["dt"] + 4.0  # delta ~ 4: decays down to 2**-1000 over a chunk
    got = run("torch", inputs, torch.float32, grads=False, **kw)
    want = run("reference", upcast_like(inputs, torch.float32), F64, grads=False, **kw)
    assert_all_close(got, want, TOL[torch.float32])


def test_forward_decays_are_never_subnormal():
    """The forward-only decays: no float32 subnormal, within 2**-100 of exp2; exact with autograd
    and in float64."""
    from mambakit.ops.ssd.torch import EXP2_FLOOR, _exp2_decay

    d = torch.linspace(-300.0, 0.0, 10001)
    got = _exp2_decay(d, grad=False)
    tiny = torch.finfo(torch.float32).tiny  # smallest normal
    assert not ((got != 0) & (got.abs() < tiny)).any()
    assert (got - torch.exp2(d)).abs().max().item() <= 2.0**EXP2_FLOOR
    keep = d >= EXP2_FLOOR
    assert torch.equal(got[keep], torch.exp2(d)[keep])
    assert torch.equal(_exp2_decay(d, grad=True), torch.exp2(d))
    assert torch.equal(_exp2_decay(d.double(), grad=False), torch.exp2(d.double()))


@pytest.mark.parametrize("chunk", [3, 4, 16])
def test_seq_idx_torch_matches_reference(chunk):
    inputs, kw = build((2, 14, 4, 3, 2, 4, chunk), OPTIONS[0], seed=5)
    # boundaries on and off chunk edges, a one-token document, a row with a single document
    seq_idx = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 2, 3, 3, 3, 3, 3, 3], [5] * 14], dtype=torch.int32)
    got = run("torch", inputs, torch.float32, seq_idx=seq_idx, **kw)
    want = run("reference", upcast_like(inputs, torch.float32), F64, seq_idx=seq_idx, **kw)
    assert_all_close(got, want, TOL[torch.float32])


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_seq_idx_packing_equals_separate_sequences(backend):
    lengths, chunk = [5, 9, 1, 4], 4
    t = make(1, sum(lengths), 4, 3, 2, 4, seed=9)
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    common = dict(chunk_size=chunk, D=t["D"], dt_bias=t["dt_bias"], dt_softplus=True, backend=backend)
    y, final = ssd(
        t["x"], t["dt"], t["A"], t["B"], t["C"], z=t["z"], initial_state=t["initial_state"],
        return_final_state=True, seq_idx=seq_idx, **common,
    )  # fmt: skip
    start = 0
    for k, length in enumerate(lengths):
        part = slice(start, start + length)
        yk, fk = ssd(
            t["x"][:, part], t["dt"][:, part], t["A"], t["B"][:, part], t["C"][:, part], z=t["z"][:, part],
            initial_state=t["initial_state"] if k == 0 else None, return_final_state=True, **common,
        )  # fmt: skip
        assert_close(y[:, part], yk, 1e-12, f"y of sequence {k}")
        start += length
    assert_close(final, fk, 1e-12, "final state = that of the last sequence")


@pytest.mark.parametrize("chunk", [2, 4, 64])
def test_cu_seqlens_torch_matches_reference(chunk):
    lengths = [5, 1, 8, 3]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    inputs, kw = build((1, sum(lengths), 4, 3, 2, 4, chunk), OPTIONS[0], seed=13, nstates=len(lengths))
    got = run("torch", inputs, torch.float32, cu_seqlens=cu, **kw)
    want = run("reference", upcast_like(inputs, torch.float32), F64, cu_seqlens=cu, **kw)
    assert got["final"].shape == (len(lengths), 4, 3, 4)
    assert_all_close(got, want, TOL[torch.float32])


@pytest.mark.parametrize("with_initial_state", [True, False])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_cu_seqlens_equals_separate_sequences(backend, with_initial_state):
    lengths = [6, 2, 9]
    cu = torch.tensor([0, 6, 8, 17])
    t = make(1, sum(lengths), 4, 3, 1, 4, seed=17, nstates=len(lengths))
    h0 = t["initial_state"] if with_initial_state else None
    common = dict(chunk_size=4, D=t["D"], dt_bias=t["dt_bias"], dt_softplus=True, backend=backend)
    y, finals = ssd(
        t["x"], t["dt"], t["A"], t["B"], t["C"], z=t["z"], initial_state=h0,
        return_final_state=True, cu_seqlens=cu, **common,
    )  # fmt: skip
    for k in range(len(lengths)):
        part = slice(int(cu[k]), int(cu[k + 1]))
        yk, fk = ssd(
            t["x"][:, part], t["dt"][:, part], t["A"], t["B"][:, part], t["C"][:, part], z=t["z"][:, part],
            initial_state=None if h0 is None else h0[k : k + 1], return_final_state=True, **common,
        )  # fmt: skip
        assert_close(y[:, part], yk, 1e-12, f"y of sequence {k}")
        assert_close(finals[k : k + 1], fk, 1e-12, f"final state of sequence {k}")


@pytest.mark.parametrize("split", [8, 6, 1])  # on a chunk boundary, inside a chunk, after one token
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_chaining_through_initial_state(backend, split):
    t = make(2, 13, 4, 3, 2, 4, seed=19)
    common = dict(chunk_size=4, D=t["D"], dt_bias=t["dt_bias"], dt_softplus=True, backend=backend)

    def part(sl, h0):
        return ssd(
            t["x"][:, sl], t["dt"][:, sl], t["A"], t["B"][:, sl], t["C"][:, sl], z=t["z"][:, sl],
            initial_state=h0, return_final_state=True, **common,
        )  # fmt: skip

    y, final = part(slice(None), t["initial_state"])
    y1, f1 = part(slice(0, split), t["initial_state"])
    y2, f2 = part(slice(split, None), f1)
    assert_close(torch.cat([y1, y2], dim=1), y, 1e-12, "y")
    assert_close(f2, final, 1e-12, "final")


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("d_per_channel", [False, True])
def test_state_update_equals_scan(backend, d_per_channel):
    L = 6
    t = make(2, L, 4, 3, 2, 5, seed=23, d_per_channel=d_per_channel)
    kw = dict(D=t["D"], dt_bias=t["dt_bias"], dt_softplus=True, dt_limit=(0.1, 1.0))
    y_scan, final = ssd(
        t["x"], t["dt"], t["A"], t["B"], t["C"], chunk_size=4, z=t["z"],
        initial_state=t["initial_state"], return_final_state=True, backend=backend, **kw,
    )  # fmt: skip
    state = t["initial_state"].clone()
    for i in range(L):
        before = state.clone()
        y = ssd_state_update(
            state, t["x"][:, i], t["dt"][:, i], t["A"], t["B"][:, i], t["C"][:, i], z=t["z"][:, i],
            backend=backend, **kw,
        )  # fmt: skip
        assert not torch.equal(state, before), "the state must be updated in place"
        assert_close(y, y_scan[:, i], 1e-12, f"y at step {i}")
    assert_close(state, final, 1e-12, "state after the loop")


def test_state_update_dtypes():
    t = make(2, 1, 4, 3, 2, 5, seed=29)
    state = t["initial_state"].float()
    x = t["x"][:, 0].bfloat16()
    y = ssd_state_update(state, x, t["dt"][:, 0].bfloat16(), t["A"].float(), t["B"][:, 0].bfloat16(),
                         t["C"][:, 0].bfloat16())  # fmt: skip
    assert y.dtype == torch.bfloat16 and state.dtype == torch.float32 and torch.isfinite(state).all()


@pytest.mark.parametrize("mode", ["plain", "seq_idx", "cu_seqlens"])
def test_gradcheck_torch_backend(mode):
    b, L, h, p, g, n = (1, 5, 2, 2, 1, 2)
    t = make(b, L, h, p, g, n, seed=31, d_per_channel=True, nstates=2 if mode == "cu_seqlens" else 1)
    names = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state"]
    leaves = [t[k].clone().requires_grad_(True) for k in names]
    extra = {}
    if mode == "seq_idx":
        extra["seq_idx"] = torch.tensor([[0, 0, 0, 1, 1]])
    if mode == "cu_seqlens":
        extra["cu_seqlens"] = torch.tensor([0, 3, 5])

    def f(*args):
        kw = dict(zip(names, args))
        return ssd(**kw, chunk_size=2, dt_softplus=True, return_final_state=True, backend="torch", **extra)

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7)


@given(
    b=st.integers(1, 2),
    L=st.integers(1, 20),
    heads=st.sampled_from([(1, 1), (2, 1), (4, 2), (4, 4)]),
    p=st.integers(1, 3),
    n=st.integers(1, 4),
    chunk=st.integers(1, 9),
    docs=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_torch_matches_reference_hypothesis(b, L, heads, p, n, chunk, docs, seed):
    h, g = heads
    t = make(b, L, h, p, g, n, seed=seed)
    seq_idx = None
    if docs:
        gen = torch.Generator().manual_seed(seed)
        seq_idx = torch.randint(0, 4, (b, L), generator=gen).sort(dim=1).values
    kw = dict(chunk_size=chunk, dt_softplus=True, seq_idx=seq_idx)
    got = run("torch", t, F64, grads=False, **kw)
    want = run("reference", t, F64, grads=False, **kw)
    assert_all_close(got, want, 1e-10)


# ---------------------------------------------------------------- bad inputs


def _ok(**over):
    t = make(1, 6, 4, 3, 2, 5, seed=37)
    del t["z"], t["dt_bias"], t["D"]
    t.update(over)
    return t


@pytest.mark.parametrize(
    "over, name",
    [
        (dict(x=torch.zeros(1, 6, 4)), "x"),
        (dict(x=[1.0]), "x"),
        (dict(dt=torch.zeros(1, 6, 3)), "dt"),
        (dict(A=torch.zeros(4, 1)), "A"),
        (dict(B=torch.zeros(1, 6, 2)), "B"),
        (dict(B=torch.zeros(1, 6, 3, 5), C=torch.zeros(1, 6, 3, 5)), "ngroups"),
        (dict(C=torch.zeros(1, 6, 2, 4)), "C"),
        (dict(D=torch.zeros(3)), "D"),
        (dict(D=torch.zeros(4, 2)), "D"),
        (dict(z=torch.zeros(1, 6, 4, 2)), "z"),
        (dict(dt_bias=torch.zeros(5)), "dt_bias"),
        (dict(initial_state=torch.zeros(1, 4, 3, 4)), "initial_state"),
        (dict(initial_state=torch.zeros(1, 4, 3, 5, dtype=torch.int64)), "initial_state"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(chunk_size=-4), "chunk_size"),
        (dict(chunk_size=2.0), "chunk_size"),
        (dict(chunk_size=True), "chunk_size"),
        (dict(dt_limit=(0.5, 0.1)), "dt_limit"),
        (dict(dt_limit=(-1.0, 1.0)), "dt_limit"),
        (dict(dt_limit=(0.1,)), "dt_limit"),
        (dict(seq_idx=torch.tensor([[0, 0, 1, 1, 0, 2]])), "seq_idx"),
        (dict(seq_idx=torch.zeros(1, 5, dtype=torch.int64)), "seq_idx"),
        (dict(seq_idx=torch.zeros(1, 6)), "seq_idx"),
        (dict(cu_seqlens=torch.tensor([1, 6])), "cu_seqlens"),
        (dict(cu_seqlens=torch.tensor([0, 4])), "cu_seqlens"),
        (dict(cu_seqlens=torch.tensor([0, 3, 3, 6])), "cu_seqlens"),
        (dict(cu_seqlens=torch.tensor([0])), "cu_seqlens"),
        (dict(cu_seqlens=torch.tensor([0.0, 6.0])), "cu_seqlens"),
        (dict(cu_seqlens=torch.tensor([0, 2, 6]), initial_state=torch.zeros(1, 4, 3, 5)), "initial_state"),
        (dict(backend="cuda"), "backend"),
    ],
)
def test_bad_inputs_name_the_argument(over, name):
    with pytest.raises((ValueError, TypeError), match=rf"\b{re.escape(name)}\b"):
        ssd(**_ok(**over))


def test_cu_seqlens_needs_batch_one():
    t = make(2, 6, 4, 3, 2, 5, seed=41)
    del t["z"], t["dt_bias"], t["D"], t["initial_state"]
    with pytest.raises(ValueError, match="cu_seqlens"):
        ssd(**t, cu_seqlens=torch.tensor([0, 2, 6]))


def test_seq_idx_and_cu_seqlens_together_is_an_error():
    with pytest.raises(ValueError, match="seq_idx"):
        ssd(**_ok(seq_idx=torch.zeros(1, 6, dtype=torch.int64), cu_seqlens=torch.tensor([0, 6])))


@pytest.mark.parametrize(
    "over, name",
    [
        (dict(state=torch.zeros(2, 4, 3, 5, dtype=torch.int32)), "state"),  # half states are allowed
        (dict(state=torch.zeros(2, 4, 3)), "state"),
        (dict(x=torch.zeros(2, 4, 2)), "x"),
        (dict(dt=torch.zeros(2, 3)), "dt"),
        (dict(B=torch.zeros(2, 3, 5), C=torch.zeros(2, 3, 5)), "ngroups"),
        (dict(C=torch.zeros(2, 2, 4)), "C"),
        (dict(dt_limit=(1.0, 1.0)), "dt_limit"),
    ],
)
def test_state_update_bad_inputs(over, name):
    args = dict(
        state=torch.zeros(2, 4, 3, 5), x=torch.zeros(2, 4, 3), dt=torch.zeros(2, 4), A=-torch.ones(4),
        B=torch.zeros(2, 2, 5), C=torch.zeros(2, 2, 5),
    )  # fmt: skip
    args.update(over)
    with pytest.raises((ValueError, TypeError), match=rf"\b{re.escape(name)}\b"):
        ssd_state_update(**args)
