"""Triton selective scan (Mamba-1) against the reference backend: forward, backward, states, packing, steps.

On CPU the kernels run through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so shapes
are tiny; `gpu`-marked tests run larger shapes on CUDA only.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mambakit.ops import selective_scan, selective_state_update

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs CUDA or TRITON_INTERPRET=1",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True, scope="module")
def _vectorized_interpreter_scan():
    """Triton's interpreter runs `tl.associative_scan` one element at a time in Python, which makes the scan
    kernels ~100x slower than the rest of the interpreted code. Swap in an equivalent scan that walks the
    scan axis and calls the same combine function on whole slices (elementwise, so identical results).
    Test-only; absent interpreter internals (other Triton versions) just leave the slow path."""
    try:
        from triton.runtime.interpreter import ScanOps
    except ImportError:
        yield
        return
    if not hasattr(ScanOps, "generic_scan") or os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return

    def generic_scan(self, input):
        datas = [arg.handle.data for arg in input]
        outs = [np.empty_like(d) for d in datas]
        axis = self.axis

        def piece(i):
            return tuple(
                self.to_tensor(np.take(d, [i], axis=axis), arg.dtype) for d, arg in zip(datas, input)
            )

        acc = piece(0)
        for i in range(datas[0].shape[axis]):
            if i > 0:
                ret = self.combine_fn.fn(*acc, *piece(i))
                acc = ret if isinstance(ret, tuple) else (ret,)
            for out, a in zip(outs, acc):
                idx = [slice(None)] * out.ndim
                idx[axis] = slice(i, i + 1)
                out[tuple(idx)] = a.handle.data
        return [self.to_tensor(o, arg.dtype) for o, arg in zip(outs, input)]

    original = ScanOps.generic_scan
    ScanOps.generic_scan = generic_scan
    try:
        yield
    finally:
        ScanOps.generic_scan = original


def make_inputs(
    batch,
    seqlen,
    dim,
    dstate,
    ngroups,
    *,
    dtype=torch.float32,
    D=True,
    z=True,
    dt_bias=True,
    initial_state=True,
    ndocs=0,
    dt_softplus=True,
    seed=0,
):
    """Random inputs in realistic ranges (A < 0, softplus(dt + bias) ~ 0.05-1) as a dict of kwargs."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale + shift).to(dt).to(DEVICE)

    out = dict(
        x=rnd(batch, seqlen, dim),
        dt=rnd(batch, seqlen, dim, scale=0.5, shift=-1.0),
        A=-torch.rand(dim, dstate, generator=g).add(0.2).to(DEVICE),
        B=rnd(batch, seqlen, ngroups, dstate),
        C=rnd(batch, seqlen, ngroups, dstate),
        D=rnd(dim, dt=torch.float32) if D else None,
        z=rnd(batch, seqlen, dim) if z else None,
        dt_bias=rnd(dim, scale=0.3, dt=torch.float32) if dt_bias else None,
        dt_softplus=dt_softplus,
        initial_state=rnd(batch, dim, dstate, dt=torch.float32) if initial_state else None,
        seq_idx=None,
    )
    if ndocs:
        cuts = torch.randint(0, ndocs, (batch, seqlen), generator=g)
        out["seq_idx"] = torch.sort(cuts, dim=1).values.to(torch.int32).to(DEVICE)
    return out


TENSOR_ARGS = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")


def run(inputs, backend, upcast=False, grad=False):
    """(y, final_state) through the public entry; float64 copies of the inputs when `upcast`."""
    kw = dict(inputs)
    for k in TENSOR_ARGS:
        if kw[k] is not None:
            t = kw[k].detach().double() if upcast else kw[k].detach().clone()
            kw[k] = t.requires_grad_(grad)
    y, final = selective_scan(**kw, return_final_state=True, backend=backend)
    return y, final, kw


def assert_close_rel(actual, expected, tol, name):
    """Max error relative to the largest expected magnitude; NaN or Inf never passes."""
    assert actual.shape == expected.shape, name
    assert torch.isfinite(actual).all(), f"{name} has NaN/Inf"
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item() + 1e-12
    assert err <= tol * scale, f"{name}: max err {err:.3g} > {tol} * {scale:.3g}"


FWD_CASES = [
    # batch, seqlen, dim, dstate, ngroups, options
    (1, 1, 4, 4, 1, {}),
    (2, 7, 6, 5, 2, {"initial_state": False}),
    (2, 33, 12, 8, 2, {"ndocs": 3}),
    (1, 67, 20, 16, 1, {"D": False, "z": False, "dt_bias": False}),
    (1, 40, 36, 4, 2, {"ndocs": 4, "initial_state": False}),
    # channel blocks and dstate filled exactly: the step loop's unmasked loads (EVEN_D, EVEN_N)
    (2, 45, 32, 8, 2, {"ndocs": 2}),
]


@pytest.mark.parametrize("batch,seqlen,dim,dstate,ngroups,opts", FWD_CASES)
def test_forward_matches_reference(batch, seqlen, dim, dstate, ngroups, opts):
    inputs = make_inputs(batch, seqlen, dim, dstate, ngroups, seed=seqlen, **opts)
    y, final, _ = run(inputs, "triton")
    y_ref, final_ref, _ = run(inputs, "reference", upcast=True)
    assert y.dtype == inputs["x"].dtype and final.dtype == torch.float32
    assert_close_rel(y, y_ref, 1e-4, "y")
    assert_close_rel(final, final_ref, 1e-4, "final_state")


@pytest.mark.parametrize("reverse", [False, True])
def test_chunk_combine_never_reads_the_walks_last_chunk(reverse):
    """The chunk passes skip the chunk whose end state (forward) or outgoing adjoint (backward) feeds no
    other chunk, leaving its entries unwritten: the combine must give the same values with infinities
    there, and (under the interpreter, where arithmetic on them warns) must not compute with them."""
    import importlib
    import warnings

    combine = importlib.import_module("mambakit.ops.selective_scan.triton.chunk_combine").combine_chunks
    g = torch.Generator().manual_seed(5)
    ends = torch.randn(2, 4, 3, 5, generator=g)
    decays = torch.rand(2, 4, 3, 5, generator=g)
    init = torch.randn(2, 3, 5, generator=g)
    order = list(range(4))[::-1] if reverse else list(range(4))
    want, v = torch.empty_like(ends), init.clone()
    for c in order:
        want[:, c] = v
        v = ends[:, c] + decays[:, c] * v
    ends[:, order[-1]] = float("inf")
    decays[:, order[-1]] = float("inf")
    decays[:, order[-1], :, ::2] = -float("inf")  # inf + inf * v or inf - inf * v: NaN for either sign of v
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = combine(ends.to(DEVICE), decays.to(DEVICE), init.to(DEVICE), reverse=reverse).cpu()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seq_chunks", [2, 3])
def test_sequence_chunks_match_reference(seq_chunks):
    """The chunk-parallel paths (used when batch x channel blocks leave the GPU idle): forward chunks from
    zero state, a combine of end states and decays, then a rescan; backward start states and adjoint
    carries from chunk passes. With resets, an initial state and a final-state gradient."""
    from mambakit.ops.selective_scan.triton.scan_bwd import selective_scan_bwd
    from mambakit.ops.selective_scan.triton.scan_fwd import selective_scan_fwd

    inputs = make_inputs(2, 75, 6, 5, 2, ndocs=3, seed=29)
    names = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "dt_softplus", "initial_state", "seq_idx")
    args = [inputs[k] for k in names]
    y, final = selective_scan_fwd(*args, seq_chunks=seq_chunks)
    y_ref, final_ref, kw = run(inputs, "reference", upcast=True, grad=True)
    assert_close_rel(y, y_ref.detach(), 1e-4, "y")
    assert_close_rel(final, final_ref.detach(), 1e-4, "final_state")
    g = torch.Generator().manual_seed(2)
    dy = torch.randn(y.shape, generator=g).to(DEVICE)
    dfinal = torch.randn(final.shape, generator=g).to(DEVICE)
    want = torch.autograd.grad((y_ref * dy).sum() + (final_ref * dfinal).sum(), [kw[k] for k in TENSOR_ARGS])
    got = selective_scan_bwd(dy, dfinal, *args, seq_chunks=seq_chunks)
    for name, a, b in zip(TENSOR_ARGS, got, want):
        assert_close_rel(a, b, 2e-4, f"d{name}")


def _grads(inputs, backend, upcast, seed):
    y, final, kw = run(inputs, backend, upcast=upcast, grad=True)
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(y.shape, generator=g).to(DEVICE, y.dtype)
    dfinal = torch.randn(final.shape, generator=g).to(DEVICE, final.dtype)
    loss = (y * dy).sum() + (final * dfinal).sum()
    names = [k for k in TENSOR_ARGS if kw[k] is not None]
    grads = torch.autograd.grad(loss, [kw[k] for k in names])
    return dict(zip(names, grads))


BWD_CASES = [
    (1, 1, 4, 4, 1, {}),
    (2, 21, 10, 6, 2, {"ndocs": 3}),
    (1, 35, 18, 16, 1, {"D": False, "z": False, "initial_state": False}),
]


@pytest.mark.parametrize("batch,seqlen,dim,dstate,ngroups,opts", BWD_CASES)
def test_backward_matches_reference(batch, seqlen, dim, dstate, ngroups, opts):
    inputs = make_inputs(batch, seqlen, dim, dstate, ngroups, seed=seqlen + 1, **opts)
    got = _grads(inputs, "triton", upcast=False, seed=seqlen)
    want = _grads(inputs, "reference", upcast=True, seed=seqlen)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == inputs[name].dtype, name
        assert_close_rel(got[name], want[name], 2e-4, f"d{name}")


@settings(max_examples=6, deadline=None)
@given(
    batch=st.integers(1, 2),
    seqlen=st.integers(1, 40),
    dim_per_group=st.integers(1, 20),
    ngroups=st.sampled_from([1, 2]),
    dstate=st.integers(1, 17),
    flags=st.lists(st.booleans(), min_size=6, max_size=6),
    ndocs=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_forward_and_backward(
    batch, seqlen, dim_per_group, ngroups, dstate, flags, ndocs, seed
):
    D, z, dt_bias, h0, softplus, want_final = flags
    inputs = make_inputs(
        batch, seqlen, dim_per_group * ngroups, dstate, ngroups, D=D, z=z, dt_bias=dt_bias,
        initial_state=h0, ndocs=ndocs, dt_softplus=softplus, seed=seed,
    )  # fmt: skip
    if not softplus:  # delta must stay positive without softplus
        inputs["dt"] = inputs["dt"].abs() * 0.5
    got = _grads(inputs, "triton", upcast=False, seed=seed)
    want = _grads(inputs, "reference", upcast=True, seed=seed)
    y, final, _ = run(inputs, "triton")
    y_ref, final_ref, _ = run(inputs, "reference", upcast=True)
    assert_close_rel(y, y_ref, 1e-4, "y")
    if want_final:
        assert_close_rel(final, final_ref, 1e-4, "final_state")
    for name in want:
        assert_close_rel(got[name], want[name], 2e-4, f"d{name}")


@pytest.mark.parametrize(
    "config,seq_chunks", [((8, 32, 4), 1), ((32, 8, 4), 1), ((16, 64, 8), 1), ((8, 32, 4), 3)]
)
def test_tile_configurations(config, seq_chunks):
    """Other (BLOCK_L, BLOCK_D, num_warps) than the interpreter's default, e.g. the GPU defaults and the
    benchmark sweep's, through both launchers against the reference."""
    from mambakit.ops.selective_scan.triton.scan_bwd import selective_scan_bwd
    from mambakit.ops.selective_scan.triton.scan_fwd import selective_scan_fwd

    inputs = make_inputs(1, 37, 40, 5, 1, ndocs=2, seed=37)
    names = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "dt_softplus", "initial_state", "seq_idx")
    args = [inputs[k] for k in names]
    y, final = selective_scan_fwd(*args, config=config, seq_chunks=seq_chunks)
    y_ref, final_ref, kw = run(inputs, "reference", upcast=True, grad=True)
    assert_close_rel(y, y_ref.detach(), 1e-4, "y")
    assert_close_rel(final, final_ref.detach(), 1e-4, "final_state")
    g = torch.Generator().manual_seed(1)
    dy = torch.randn(y.shape, generator=g).to(DEVICE)
    dfinal = torch.randn(final.shape, generator=g).to(DEVICE)
    grad_names = [k for k in TENSOR_ARGS if kw[k] is not None]
    want = torch.autograd.grad((y_ref * dy).sum() + (final_ref * dfinal).sum(), [kw[k] for k in grad_names])
    got = selective_scan_bwd(dy, dfinal, *args, config=config, seq_chunks=seq_chunks)
    for name, a, b in zip(TENSOR_ARGS, got, want):
        assert_close_rel(a, b, 2e-4, f"d{name}")


@pytest.mark.parametrize(
    "config,seq_chunks",
    [((32, 1, 4, 0), 1), ((64, 2, 4, 1), 1), ((32, 1, 2, 0), 4), ((16, 1, 4, 1), 5), ((16, 1, 2, 1), 1)],
)
@pytest.mark.parametrize("case", [(1, 37, 40, 5, 1, 2), (2, 18, 24, 16, 2, 0), (1, 3, 8, 3, 1, 1)])
def test_step_loop_backward_configurations(config, seq_chunks, case):
    """The step-loop backward (the default) with channel blocks of several warps, blocks wider than the
    group, more chunks than segments fill, and lengths that are not whole 4-step segments."""
    from mambakit.ops.selective_scan.triton.seq_bwd import selective_scan_bwd_seq

    batch, seqlen, dim, dstate, ngroups, ndocs = case
    inputs = make_inputs(batch, seqlen, dim, dstate, ngroups, ndocs=ndocs, seed=seqlen + seq_chunks)
    names = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "dt_softplus", "initial_state", "seq_idx")
    y_ref, final_ref, kw = run(inputs, "reference", upcast=True, grad=True)
    g = torch.Generator().manual_seed(seq_chunks)
    dy = torch.randn(y_ref.shape, generator=g).to(DEVICE)
    dfinal = torch.randn(final_ref.shape, generator=g).to(DEVICE)
    want = torch.autograd.grad((y_ref * dy).sum() + (final_ref * dfinal).sum(), [kw[k] for k in TENSOR_ARGS])
    got = selective_scan_bwd_seq(
        dy, dfinal, *[inputs[k] for k in names], seq_chunks=seq_chunks, config=config
    )
    for name, a, b in zip(TENSOR_ARGS, got, want):
        assert a.dtype == inputs[name].dtype, name
        assert_close_rel(a, b, 2e-4, f"d{name}")


@pytest.mark.parametrize(
    "kernel,seq_config,seq_chunks",
    [
        ("tile", None, 1), ("tile", None, 3), ("seq", "16,1,1", 1), ("seq", "32,1,2", 4),
        ("seq", "64,2,1", 3), ("seq", "128,1,1", 2),
    ],  # fmt: skip
)
@pytest.mark.parametrize("case", FWD_CASES[1:])
def test_forward_kernels_match_reference(monkeypatch, kernel, seq_config, seq_chunks, case):
    """Both forward kernels (the step loop, default on GPUs, and the tile scan), with sequence chunks and
    channel blocks wider than dim, on the forward cases: resets, groups, initial states, no D/z/bias."""
    from mambakit.ops.selective_scan.triton.scan_fwd import selective_scan_fwd

    monkeypatch.setenv("MAMBAKIT_SCAN_KERNEL", kernel)
    if seq_config:
        monkeypatch.setenv("MAMBAKIT_SCAN_SEQ_CONFIG", seq_config)
    batch, seqlen, dim, dstate, ngroups, opts = case
    inputs = make_inputs(batch, seqlen, dim, dstate, ngroups, seed=seqlen + seq_chunks, **opts)
    names = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "dt_softplus", "initial_state", "seq_idx")
    y, final = selective_scan_fwd(*[inputs[k] for k in names], seq_chunks=seq_chunks)
    y_ref, final_ref, _ = run(inputs, "reference", upcast=True)
    assert_close_rel(y, y_ref, 1e-4, "y")
    assert_close_rel(final, final_ref, 1e-4, "final_state")


def test_low_precision_inputs_against_upcast_reference():
    """bf16 x/dt/B/C/z (fp32 parameters and state) against the reference run on the same values in fp64."""
    inputs = make_inputs(2, 19, 12, 8, 2, dtype=torch.bfloat16, ndocs=2, seed=5)
    y, final, _ = run(inputs, "triton")
    y_ref, final_ref, _ = run(inputs, "reference", upcast=True)
    assert y.dtype == torch.bfloat16
    assert_close_rel(y, y_ref, 1e-2, "y")
    assert_close_rel(final, final_ref, 1e-4, "final_state")  # fp32 state from exactly the same inputs
    got = _grads(inputs, "triton", upcast=False, seed=1)
    want = _grads(inputs, "reference", upcast=True, seed=1)
    for name in want:
        assert got[name].dtype == inputs[name].dtype, name
        assert_close_rel(got[name], want[name], 2e-2, f"d{name}")


def test_gradcheck_float64():
    inputs = make_inputs(1, 5, 4, 3, 2, dtype=torch.float64, ndocs=2, seed=3)
    inputs["seq_idx"] = torch.tensor([[0, 0, 1, 1, 1]], dtype=torch.int32, device=DEVICE)
    names = [k for k in TENSOR_ARGS]
    args = [inputs[k].double().requires_grad_() for k in names]

    def f(*tensors):
        kw = dict(inputs, **dict(zip(names, tensors)))
        y, final = selective_scan(**kw, return_final_state=True, backend="triton")
        return y, final

    assert torch.autograd.gradcheck(f, args, fast_mode=True)


def test_packed_documents_equal_separate_runs():
    """seq_idx resets: a packed row gives the same outputs as each document scanned from zero state."""
    inputs = make_inputs(1, 24, 8, 4, 1, initial_state=False, seed=7)
    bounds = [0, 5, 6, 17, 24]
    seq_idx = torch.zeros(1, 24, dtype=torch.int64)
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        seq_idx[:, lo:hi] = i
    packed = dict(inputs, seq_idx=seq_idx.to(DEVICE))
    y_packed, final_packed, _ = run(packed, "triton")
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        part = dict(inputs)
        for k in ("x", "dt", "B", "C", "z"):
            part[k] = inputs[k][:, lo:hi]
        y_part, final_part, _ = run(part, "triton")
        assert_close_rel(y_packed[:, lo:hi], y_part, 1e-5, f"y[{lo}:{hi}]")
    assert_close_rel(final_packed, final_part, 1e-5, "final_state of the last document")


def test_strided_views_like_in_proj_outputs():
    """x and z as halves of one (batch, seqlen, 2 * dim) tensor, B and C as slices of x_proj's output."""
    batch, seqlen, dim, dstate = 2, 18, 10, 4
    inputs = make_inputs(batch, seqlen, dim, dstate, 1, seed=11)
    xz = torch.cat([inputs["x"], inputs["z"]], dim=-1)
    bc = torch.cat(
        [torch.randn(batch, seqlen, 3, device=DEVICE), inputs["B"][:, :, 0], inputs["C"][:, :, 0]], -1
    )
    views = dict(inputs, x=xz[..., :dim], z=xz[..., dim:])
    views["B"] = bc[..., 3 : 3 + dstate].unsqueeze(2)
    views["C"] = bc[..., 3 + dstate :].unsqueeze(2)
    assert not views["x"].is_contiguous() and not views["B"].is_contiguous()
    y, final, _ = run(views, "triton")
    y_ref, final_ref, _ = run(inputs, "triton")
    assert torch.equal(y, y_ref) and torch.equal(final, final_ref)


def test_time_invariant_B_C_broadcast_with_zero_strides():
    """The LTI ablation of the tasks (tasks/models.py) passes B and C (dim, dstate) expanded over batch
    and time (stride 0) as ngroups = dim groups of one channel: forward and gradients (summed through
    the expand) equal the contiguous copies' through the reference."""
    batch, seqlen, dim, dstate = 2, 13, 6, 4
    inputs = make_inputs(batch, seqlen, dim, dstate, dim, seed=21)
    g = torch.Generator().manual_seed(22)
    B_param = torch.randn(dim, dstate, generator=g).to(DEVICE).requires_grad_()
    C_param = torch.randn(dim, dstate, generator=g).to(DEVICE).requires_grad_()
    outs = {}
    for backend, contiguous in (("triton", False), ("reference", True)):
        B = B_param.expand(batch, seqlen, dim, dstate)
        C = C_param.expand(batch, seqlen, dim, dstate)
        if contiguous:
            B, C = B.contiguous(), C.contiguous()
        else:
            assert B.stride()[:2] == (0, 0)
        kw = dict(inputs, B=B, C=C)
        kw["x"] = inputs["x"].detach().clone().requires_grad_()
        y, final = selective_scan(**kw, return_final_state=True, backend=backend)
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(23)).to(DEVICE)
        gB, gC, gx = torch.autograd.grad((y * gy).sum() + final.sum(), (B_param, C_param, kw["x"]))
        outs[backend] = (y, final, gB, gC, gx)
    for name, got, want in zip(("y", "final", "dB", "dC", "dx"), outs["triton"], outs["reference"]):
        assert_close_rel(got, want, 1e-5, name)


def test_state_update_matches_scan_steps():
    """Token-by-token decoding with selective_state_update equals one scan over the same tokens."""
    batch, seqlen, dim, dstate, ngroups = 2, 3, 12, 5, 2
    inputs = make_inputs(batch, seqlen, dim, dstate, ngroups, seed=13)
    y_scan, final_scan, _ = run(inputs, "reference", upcast=True)
    state = inputs["initial_state"].clone()
    for t in range(seqlen):
        step = {k: inputs[k][:, t] for k in ("x", "dt", "B", "C", "z")}
        y_t = selective_state_update(
            state, **step, A=inputs["A"], D=inputs["D"], dt_bias=inputs["dt_bias"], dt_softplus=True,
            backend="triton",
        )  # fmt: skip
        assert y_t.dtype == inputs["x"].dtype
        assert_close_rel(y_t, y_scan[:, t], 1e-5, f"y[{t}]")
    assert_close_rel(state, final_scan, 1e-5, "state")


def test_state_update_strided_state_and_bf16():
    """The state may be a slice of a larger cache tensor; bf16 activations update an fp32 state."""
    batch, dim, dstate = 3, 8, 4
    inputs = make_inputs(batch, 1, dim, dstate, 1, dtype=torch.bfloat16, seed=17)
    cache = torch.randn(2, batch, dim, dstate, device=DEVICE)
    state = cache[1]
    expected_state = state.clone()
    step = {k: inputs[k][:, 0] for k in ("x", "dt", "B", "C", "z")}
    common = dict(A=inputs["A"], D=inputs["D"], dt_bias=inputs["dt_bias"], dt_softplus=True)
    y_ref = selective_state_update(expected_state, **step, **common, backend="reference")
    untouched = cache[0].clone()
    y = selective_state_update(state, **step, **common, backend="triton")
    assert y.dtype == torch.bfloat16
    assert_close_rel(y, y_ref, 1e-2, "y")
    assert_close_rel(cache[1], expected_state, 1e-5, "state in the cache")
    assert torch.equal(cache[0], untouched)


def test_bad_arguments_name_the_argument():
    inputs = make_inputs(1, 4, 4, 2, 1, seed=0)
    with pytest.raises(ValueError, match="dt"):
        selective_scan(**dict(inputs, dt=inputs["dt"][:, :3]), backend="triton")
    with pytest.raises(ValueError, match="ngroups"):
        selective_scan(
            **dict(
                inputs, B=torch.randn(1, 4, 3, 2, device=DEVICE), C=torch.randn(1, 4, 3, 2, device=DEVICE)
            ),
            backend="triton",
        )
    with pytest.raises(TypeError, match="seq_idx"):
        selective_scan(**dict(inputs, seq_idx=torch.zeros(1, 4)), backend="triton")
    with pytest.raises(TypeError, match="state"):
        step = [inputs[k][:, 0] for k in ("x", "dt")] + [inputs["A"]] + [inputs[k][:, 0] for k in ("B", "C")]
        selective_state_update(torch.zeros(1, 4, 2, dtype=torch.int32), *step, backend="triton")


def test_custom_op_registration():
    """The custom ops pass torch.library's checks (schema, fake tensor, autograd registration)."""
    from mambakit.ops.selective_scan.triton.autograd import _scan_fwd_op

    inputs = make_inputs(1, 3, 4, 2, 1, seed=19)
    args = [inputs[k] for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")]
    args = [a.requires_grad_() for a in args] + [True, inputs["initial_state"].requires_grad_(), None]
    torch.library.opcheck(
        _scan_fwd_op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration")
    )


def test_state_update_custom_op():
    """The in-place step is a custom op declaring its mutation of `state` (opcheck, and a compiled step)."""
    from mambakit.ops.selective_scan.triton.state_update import _state_update_op, selective_state_update_impl

    inputs = make_inputs(2, 1, 6, 3, 2, seed=31)
    step = [inputs[k][:, 0] for k in ("x", "dt")] + [inputs["A"]] + [inputs[k][:, 0] for k in ("B", "C")]
    rest = [inputs["D"], inputs["z"][:, 0], inputs["dt_bias"], True]
    state = inputs["initial_state"].clone()
    torch.library.opcheck(
        _state_update_op, [state, *step, *rest], test_utils=("test_schema", "test_faketensor")
    )
    eager_state, compiled_state = state.clone(), state.clone()
    y_eager = selective_state_update_impl(eager_state, *step, *rest)
    compiled = torch.compile(selective_state_update_impl, backend="aot_eager", fullgraph=True)
    y_compiled = compiled(compiled_state, *step, *rest)
    assert torch.equal(y_eager, y_compiled) and torch.equal(eager_state, compiled_state)
    assert not torch.equal(eager_state, state)


def test_torch_compile_traces_through_the_op():
    """fullgraph torch.compile of the backend (aot_eager: the op's tracing and autograd, without CPU code
    generation). The backend is called directly: the public entry's importlib dispatch and its value check
    of seq_idx are not traceable in a full graph."""
    from mambakit.ops.selective_scan.triton import selective_scan_impl

    inputs = make_inputs(1, 9, 6, 4, 1, ndocs=2, seed=23)

    def loss(x, dt, A, B, C, D, z, dt_bias, initial_state):
        y, final = selective_scan_impl(
            x, dt, A, B, C, D, z, dt_bias, True, initial_state, True, inputs["seq_idx"]
        )
        return (y * y).sum() + final.sum()

    leaves = [inputs[k].detach().clone().requires_grad_() for k in TENSOR_ARGS]
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(*leaves), leaves)
    want = torch.autograd.grad(loss(*leaves), leaves)
    for name, a, b in zip(TENSOR_ARGS, got, want):
        assert_close_rel(a, b, 1e-6, f"d{name}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seqlen", [1000, 4096, 16384])
def test_gpu_shapes_against_torch_backend(dtype, seqlen):
    inputs = make_inputs(2, seqlen, 384, 16, 2, dtype=dtype, ndocs=3, seed=seqlen)
    y, final, _ = run(inputs, "triton")
    y_ref, final_ref, _ = run(inputs, "torch", upcast=True)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert_close_rel(y, y_ref, tol, "y")
    assert_close_rel(final, final_ref, 1e-3 if dtype == torch.float32 else 1e-2, "final_state")
    got = _grads(inputs, "triton", upcast=False, seed=0)
    want = _grads(inputs, "torch", upcast=True, seed=0)
    for name in want:
        assert_close_rel(got[name], want[name], 1e-3 if dtype == torch.float32 else 3e-2, f"d{name}")
