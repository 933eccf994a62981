"""`A_is_log=True` on the one-token steps: A holds A_log (float32 or bfloat16, as a layer's parameter
may be) and every backend uses -exp(A_log) in float32, exactly as if that A had been passed."""

from __future__ import annotations

import pytest
import torch

from tests.ops.test_state_update_half_states import BACKENDS, DEVICE, OPS


@pytest.mark.parametrize("op_name", list(OPS))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("log_dtype", [torch.float32, torch.bfloat16])
def test_A_is_log_equals_passing_minus_exp(op_name, backend, log_dtype):
    op, make = OPS[op_name]
    gen = torch.Generator().manual_seed(7)
    inputs, state_shape = make(gen)
    A_log = torch.log(-inputs.pop("A")).to(log_dtype)  # the layers' parameter, in their dtype
    start = torch.randn(*state_shape, generator=gen).to(DEVICE)
    want_state, got_state = start.clone(), start.clone()
    want_y = op(want_state, A=-torch.exp(A_log.float()), **inputs, backend=backend)
    got_y = op(got_state, A=A_log, **inputs, backend=backend, A_is_log=True)
    torch.testing.assert_close(got_y, want_y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_state, want_state, rtol=1e-6, atol=1e-6)
    assert not torch.equal(got_state, start)  # the step did run
