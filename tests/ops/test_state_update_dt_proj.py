"""`dt_proj_weight` on the Mamba-1 step: dt is the low-rank dt (batch, dt_rank) and every backend uses
dt @ dt_proj_weight^T, computed in float32 inside the step, exactly as if that dt had been passed.
The Triton kernel runs through the interpreter on CPU, at dt ranks and channel counts that are not
powers of two and do not fill a tile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mambakit.ops import selective_state_update
from tests.ops.test_state_update_half_states import BACKENDS, DEVICE, _rand


def _inputs(gen, batch, dim, dstate, ngroups, dt_rank, dtype):
    w = _rand(dim, dt_rank, gen=gen, scale=dt_rank**-0.5, dtype=dtype)
    return dict(
        x=_rand(batch, dim, gen=gen, dtype=dtype),
        dt_low=_rand(batch, dt_rank, gen=gen, dtype=dtype),
        A=-torch.rand(dim, dstate, generator=gen).add(0.2).to(DEVICE),
        B=_rand(batch, ngroups, dstate, gen=gen, dtype=dtype),
        C=_rand(batch, ngroups, dstate, gen=gen, dtype=dtype),
        D=_rand(dim, gen=gen),
        z=_rand(batch, dim, gen=gen, dtype=dtype),
        dt_bias=_rand(dim, gen=gen, scale=0.3, shift=-2.0),
    ), w


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "batch,dim,dstate,ngroups,dt_rank",
    [(1, 12, 5, 1, 1), (3, 12, 5, 2, 3), (2, 96, 16, 1, 6), (2, 130, 16, 2, 48), (1, 40, 8, 4, 17)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dt_proj_inside_the_step_equals_dt_passed(backend, batch, dim, dstate, ngroups, dt_rank, dtype):
    gen = torch.Generator().manual_seed(dim + dt_rank)
    t, w = _inputs(gen, batch, dim, dstate, ngroups, dt_rank, dtype)
    start = torch.randn(batch, dim, dstate, generator=gen).to(DEVICE)
    want_state, got_state = start.clone(), start.clone()
    dt = F.linear(t["dt_low"].double(), w.double()).float()  # the projection, unrounded
    common = dict(A=t["A"], B=t["B"], C=t["C"], D=t["D"], z=t["z"], dt_bias=t["dt_bias"], dt_softplus=True)
    want_y = selective_state_update(want_state, t["x"], dt, **common, backend=backend)
    got_y = selective_state_update(
        got_state, t["x"], t["dt_low"], **common, backend=backend, dt_proj_weight=w
    )
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=2e-2)
    assert torch.isfinite(got_y).all() and got_y.dtype == dtype
    torch.testing.assert_close(got_y, want_y, **tol)
    torch.testing.assert_close(got_state, want_state, rtol=1e-5, atol=1e-5)  # float32 state either way
    assert not torch.equal(got_state, start)


def test_dt_proj_with_A_log_and_half_state_matches_the_reference():
    gen = torch.Generator().manual_seed(3)
    t, w = _inputs(gen, 2, 24, 8, 2, 5, torch.float32)
    A_log = torch.log(-t.pop("A")).bfloat16()
    start = torch.randn(2, 24, 8, generator=gen).to(DEVICE).bfloat16()
    outs = {}
    for backend in BACKENDS:
        state = start.clone()
        y = selective_state_update(
            state, t["x"], t["dt_low"], A_log, t["B"], t["C"], t["D"], t["z"], t["dt_bias"], True,
            backend=backend, A_is_log=True, dt_proj_weight=w,
        )  # fmt: skip
        outs[backend] = (y, state.float())
    for backend in ("torch", "triton"):
        for a, b in zip(outs[backend], outs["reference"]):
            torch.testing.assert_close(a, b, rtol=8e-3, atol=1e-5)  # one bf16 rounding of the state


def test_dt_proj_shapes_are_checked():
    gen = torch.Generator().manual_seed(0)
    t, w = _inputs(gen, 2, 12, 4, 1, 3, torch.float32)
    state = torch.zeros(2, 12, 4, device=DEVICE)
    args = (t["x"], t["dt_low"], t["A"], t["B"], t["C"])
    with pytest.raises(ValueError, match=r"dt_proj_weight must have shape \(12, \*\)"):
        selective_state_update(state, *args, dt_proj_weight=w[:5])
    with pytest.raises(ValueError, match=r"dt must have shape \(2, 4\)"):
        selective_state_update(state, *args, dt_proj_weight=torch.zeros(12, 4, device=DEVICE))
    with pytest.raises(ValueError, match=r"dt must have shape \(2, 12\)"):
        selective_state_update(state, *args)  # the low-rank dt without its projection
