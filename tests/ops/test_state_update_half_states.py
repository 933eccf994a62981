"""Decoding steps on bfloat16 / float16 states (half the memory of a float32 decoding state): every
backend of `selective_state_update` and `ssd_state_update` runs the step in float32 on the upcast
state, returns y from the unrounded new state, and stores the new state rounded to the state's dtype.
The expectation is built from the float32 step on the upcast state, so the test checks exactly that
contract; the Triton kernels run through the interpreter on CPU (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

from mambakit.ops import selective_state_update, ssd_state_update

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["reference", "torch", "triton"]
HALF = [torch.bfloat16, torch.float16]


def _rand(*shape, gen, scale=1.0, shift=0.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=gen) * scale + shift).to(dtype).to(DEVICE)


def _selective_inputs(gen, batch=3, dim=12, dstate=5, ngroups=2):
    return dict(
        x=_rand(batch, dim, gen=gen),
        dt=_rand(batch, dim, gen=gen, scale=0.5, shift=-1.0),
        A=-torch.rand(dim, dstate, generator=gen).add(0.2).to(DEVICE),
        B=_rand(batch, ngroups, dstate, gen=gen),
        C=_rand(batch, ngroups, dstate, gen=gen),
        D=_rand(dim, gen=gen),
        z=_rand(batch, dim, gen=gen),
        dt_bias=_rand(dim, gen=gen, scale=0.3),
        dt_softplus=True,
    ), (batch, dim, dstate)


def _ssd_inputs(gen, batch=2, nheads=4, headdim=6, dstate=8, ngroups=2):
    return dict(
        x=_rand(batch, nheads, headdim, gen=gen),
        dt=_rand(batch, nheads, gen=gen, scale=0.5, shift=-1.0),
        A=-torch.rand(nheads, generator=gen).add(0.5).to(DEVICE),
        B=_rand(batch, ngroups, dstate, gen=gen),
        C=_rand(batch, ngroups, dstate, gen=gen),
        D=_rand(nheads, gen=gen),
        z=_rand(batch, nheads, headdim, gen=gen),
        dt_bias=_rand(nheads, gen=gen, scale=0.3),
        dt_softplus=True,
    ), (batch, nheads, headdim, dstate)


OPS = {"selective_state_update": (selective_state_update, _selective_inputs),
       "ssd_state_update": (ssd_state_update, _ssd_inputs)}  # fmt: skip


@pytest.mark.parametrize("op_name", list(OPS))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("state_dtype", HALF)
def test_half_state_steps_in_float32_and_rounds_on_store(op_name, backend, state_dtype):
    op, make = OPS[op_name]
    gen = torch.Generator().manual_seed(5)
    inputs, state_shape = make(gen)
    state = _rand(*state_shape, gen=gen, dtype=state_dtype)
    want_state = state.float()  # the float32 step on the upcast state is the contract
    want_y = op(want_state, **inputs, backend="reference")
    for _ in range(2):  # two steps: the second starts from a rounded state
        got_y = op(state, **inputs, backend=backend)
        assert state.dtype == state_dtype and got_y.dtype == inputs["x"].dtype
        assert torch.isfinite(got_y).all() and torch.isfinite(state.float()).all()
        torch.testing.assert_close(got_y, want_y, rtol=1e-5, atol=1e-5 * float(want_y.abs().max()))
        # reference and torch round to nearest even, as `Tensor.to` does; Triton's interpreter
        # converts float32 to bfloat16 by another rounding (half of the values differ by one unit in
        # the last place, with or without fp_downcast_rounding="rtne"), so Triton gets one ulp
        ulp = torch.finfo(state_dtype).eps if backend == "triton" else 0.0
        torch.testing.assert_close(state, want_state.to(state_dtype), rtol=ulp, atol=0)
        want_state = state.float()  # what the next step reads
        want_y = op(want_state, **inputs, backend="reference")


@pytest.mark.parametrize("op_name", list(OPS))
def test_half_state_stays_close_to_a_float32_state_over_many_steps(op_name):
    """64 steps from the same start: the bfloat16 state tracks the float32 one to bfloat16 precision
    (the rounding errors do not grow: every step decays the state)."""
    op, make = OPS[op_name]
    gen = torch.Generator().manual_seed(6)
    inputs, state_shape = make(gen)
    state32 = _rand(*state_shape, gen=gen)
    state16 = state32.to(torch.bfloat16)
    for _ in range(64):
        y32 = op(state32, **inputs, backend="torch")
        y16 = op(state16, **inputs, backend="torch")
    scale = float(state32.abs().max())
    torch.testing.assert_close(state16.float(), state32, rtol=0, atol=3e-2 * scale)
    torch.testing.assert_close(y16, y32, rtol=0, atol=3e-2 * float(y32.abs().max()))
