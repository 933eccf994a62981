"""Every mambakit custom op's real results have exactly the sizes, strides and dtypes its fake declares.

torch.compile trusts the fake (meta) kernels and asserts the real strides at run time; on the H100,
`ssd_bwd` returned ddt as a transposed (batch, nheads, seqlen) buffer while the fake declared it
contiguous. The inputs here are shaped as the layers produce them: non-contiguous slices of an in_proj
output, packed documents (int32 seq_idx), batch 2, seqlen 64, headdim 8, dstate 16, bf16 and fp32.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_flatten, tree_map

import mambakit.ops.conv1d.triton.functions  # noqa: F401 (registers the custom ops)
import mambakit.ops.norm.triton.functions  # noqa: F401
import mambakit.ops.selective_scan.triton.autograd  # noqa: F401
import mambakit.ops.selective_scan.triton.state_update  # noqa: F401
import mambakit.ops.ssd.triton.autograd  # noqa: F401
import mambakit.ops.ssd.triton.state_update  # noqa: F401

BATCH, SEQLEN, NHEADS, HEADDIM, NGROUPS, DSTATE, WIDTH = 2, 64, 4, 8, 1, 16, 4
D_INNER = NHEADS * HEADDIM
CONV_DIM = D_INNER + 2 * NGROUPS * DSTATE
mk = torch.ops.mambakit
# the real ops run where the Triton kernels can: on the GPU when there is one, else the interpreter
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _seq_idx() -> torch.Tensor:
    """Packed documents as the trainer builds them: (batch, seqlen) int32, boundaries mid-chunk."""
    seq = torch.zeros(BATCH, SEQLEN, dtype=torch.int32)
    seq[0, 21:] = 1
    seq[0, 50:] = 2
    seq[1, 33:] = 1
    return seq


def _mamba2_inputs(dtype):
    """z, xBC, dt as slices of one in_proj output; x, B, C split from xBC (all non-contiguous)."""
    zxbcdt = torch.randn(BATCH, SEQLEN, D_INNER + CONV_DIM + NHEADS).to(dtype)
    z, xBC, dt = zxbcdt.split([D_INNER, CONV_DIM, NHEADS], dim=-1)
    gn = NGROUPS * DSTATE
    x, B, C = xBC.split([D_INNER, gn, gn], dim=-1)
    lead = (BATCH, SEQLEN)
    x = x.reshape(*lead, NHEADS, HEADDIM)
    B, C = B.reshape(*lead, NGROUPS, DSTATE), C.reshape(*lead, NGROUPS, DSTATE)
    return z, xBC, dt, x, B, C


def _rand(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape) * scale).to(dtype)


def _ssd_fwd_args(dtype, with_z, with_init):
    z, _, dt, x, B, C = _mamba2_inputs(dtype)
    A = -torch.rand(NHEADS) - 0.5
    D = torch.randn(NHEADS, HEADDIM)
    z4 = z.reshape(BATCH, SEQLEN, NHEADS, HEADDIM) if with_z else None
    h0 = torch.randn(BATCH, NHEADS, HEADDIM, DSTATE) if with_init else None
    seq = None if with_init else _seq_idx()
    return (x, dt, A, B, C, 32, D, z4, torch.randn(NHEADS), True, 0.0, math.inf, h0, seq)


def _ssd_bwd_args(dtype, with_z, with_init):
    fwd = _ssd_fwd_args(dtype, with_z, with_init)
    x, dt, A, B, C, chunk, D, z, bias, sp, lo, hi, h0, seq = fwd
    y, y_pre, final, states, delta, cs = mk.ssd_fwd(*fwd)
    dy = torch.randn_like(y)
    dfinal = torch.randn_like(final) if with_init else None
    return (dy, dfinal, x, dt, A, B, C, chunk, D, z, bias, sp, lo, hi, h0 is not None, seq,
            y_pre, final, states, delta, cs)  # fmt: skip


def _ssd_state_update_args(dtype):
    _, xBC, dt, _, _, _ = _mamba2_inputs(dtype)
    xBC, dt = xBC[:, 0], dt[:, 0]  # one token
    x, B, C = xBC.split([D_INNER, NGROUPS * DSTATE, NGROUPS * DSTATE], dim=-1)
    state = torch.randn(BATCH, NHEADS, HEADDIM, DSTATE)
    return (state, x.reshape(BATCH, NHEADS, HEADDIM), dt, -torch.rand(NHEADS), B.reshape(BATCH, NGROUPS, -1),
            C.reshape(BATCH, NGROUPS, -1), torch.randn(NHEADS), None, torch.randn(NHEADS), True, 0.0,
            math.inf)  # fmt: skip


def _conv_fwd_args(dtype, with_init):
    _, xBC, _, _, _, _ = _mamba2_inputs(dtype)
    weight = torch.randn(CONV_DIM, 1, WIDTH).to(dtype)[:, 0, :]
    init = torch.randn(BATCH, CONV_DIM, WIDTH - 1).to(dtype) if with_init else None
    return (xBC, weight, torch.randn(CONV_DIM).to(dtype), True, init, with_init,
            None if with_init else _seq_idx())  # fmt: skip


def _conv_bwd_args(dtype, with_init):
    x, weight, bias, silu, init, store_final, seq = _conv_fwd_args(dtype, with_init)
    out, final = mk.causal_conv1d_fwd(x, weight, bias, silu, init, store_final, seq)
    dfinal = torch.randn_like(final) if with_init else None
    return (x, weight, bias, silu, init, seq, torch.randn_like(out), dfinal)


def _conv_update_args(dtype):
    _, xBC, _, _, _, _ = _mamba2_inputs(dtype)
    weight = torch.randn(CONV_DIM, 1, WIDTH).to(dtype)[:, 0, :]
    state = torch.randn(BATCH, CONV_DIM, WIDTH - 1).to(dtype)
    return (xBC[:, 0], state, weight, torch.randn(CONV_DIM).to(dtype), True)


def _norm_fwd_args(dtype, kind):
    z, _, _, _, _, _ = _mamba2_inputs(dtype)
    y = torch.randn(BATCH, SEQLEN, D_INNER).to(dtype)
    w = torch.randn(D_INNER)
    if kind == "gated":  # Mamba-2's gated norm: z is a slice of the in_proj output
        return (y, z, None, w, 1e-5, D_INNER // NGROUPS, False, False, False)
    # the blocks' add + norm on residual streams
    return (y, None, torch.randn(BATCH, SEQLEN, D_INNER), w, 1e-5, D_INNER, False, True, True)


def _norm_bwd_args(dtype, kind):
    x, z, res, w, eps, group, before, store, in_fp32 = _norm_fwd_args(dtype, kind)
    y, res_out = mk.rms_norm_fwd(x, z, res, w, eps, group, before, store, in_fp32)
    dres = torch.randn_like(res_out) if store else None
    return (torch.randn_like(y), dres, x, z, res, w, eps, group, before)


def _scan_fwd_args(dtype, with_init):
    """Mamba-1's shapes: x, z halves of in_proj, B, C (batch, seqlen, 1, dstate) slices of x_proj."""
    xz = torch.randn(BATCH, SEQLEN, 2 * D_INNER).to(dtype)
    x, z = xz.chunk(2, dim=-1)
    dbc = torch.randn(BATCH, SEQLEN, 2 + 2 * DSTATE).to(dtype)
    _, B, C = dbc.split([2, DSTATE, DSTATE], dim=-1)
    dt = torch.randn(BATCH, SEQLEN, D_INNER).to(dtype)
    A = -torch.rand(D_INNER, DSTATE) - 0.5
    h0 = torch.randn(BATCH, D_INNER, DSTATE) if with_init else None
    seq = None if with_init else _seq_idx()
    return (x, dt, A, B.unsqueeze(-2), C.unsqueeze(-2), torch.randn(D_INNER), z, torch.randn(D_INNER), True,
            h0, seq)  # fmt: skip


def _scan_bwd_args(dtype, with_init):
    fwd = _scan_fwd_args(dtype, with_init)
    y, final = mk.selective_scan_fwd(*fwd)
    dfinal = torch.randn_like(final) if with_init else None
    return (torch.randn_like(y), dfinal, *fwd)


def _scan_update_args(dtype):
    args = _scan_fwd_args(dtype, False)
    x, dt, A, B, C, D, z, bias = (t[:, 0] if t.ndim >= 3 else t for t in args[:8])
    state = torch.randn(BATCH, D_INNER, DSTATE)
    return (state, x, dt, A, B, C, D, z, bias, True)


def _scan_update_dt_proj_args(dtype):
    """Mamba-1's decode step: the low-rank dt a slice of x_proj's output, dt_proj's weight with it."""
    state, x, _, A, B, C, D, z, bias, softplus = _scan_update_args(dtype)
    dt_low = torch.randn(BATCH, 6 + 2 * DSTATE).to(dtype)[:, :6]
    return (state, x, dt_low, A, B, C, D, z, bias, softplus, True, torch.randn(D_INNER, 6).to(dtype))


CASES = {
    "ssd_fwd": (lambda dt: _ssd_fwd_args(dt, False, False), mk.ssd_fwd),
    "ssd_fwd_z_init": (lambda dt: _ssd_fwd_args(dt, True, True), mk.ssd_fwd),
    "ssd_bwd": (lambda dt: _ssd_bwd_args(dt, False, False), mk.ssd_bwd),
    "ssd_bwd_z_init": (lambda dt: _ssd_bwd_args(dt, True, True), mk.ssd_bwd),
    "ssd_state_update": (_ssd_state_update_args, mk.ssd_state_update),
    "conv_fwd": (lambda dt: _conv_fwd_args(dt, False), mk.causal_conv1d_fwd),
    "conv_fwd_init": (lambda dt: _conv_fwd_args(dt, True), mk.causal_conv1d_fwd),
    "conv_bwd": (lambda dt: _conv_bwd_args(dt, False), mk.causal_conv1d_bwd),
    "conv_bwd_init": (lambda dt: _conv_bwd_args(dt, True), mk.causal_conv1d_bwd),
    "conv_update": (_conv_update_args, mk.causal_conv1d_update),
    "norm_fwd_gated": (lambda dt: _norm_fwd_args(dt, "gated"), mk.rms_norm_fwd),
    "norm_fwd_residual": (lambda dt: _norm_fwd_args(dt, "residual"), mk.rms_norm_fwd),
    "norm_bwd_gated": (lambda dt: _norm_bwd_args(dt, "gated"), mk.rms_norm_bwd),
    "norm_bwd_residual": (lambda dt: _norm_bwd_args(dt, "residual"), mk.rms_norm_bwd),
    "scan_fwd": (lambda dt: _scan_fwd_args(dt, False), mk.selective_scan_fwd),
    "scan_fwd_init": (lambda dt: _scan_fwd_args(dt, True), mk.selective_scan_fwd),
    "scan_bwd": (lambda dt: _scan_bwd_args(dt, False), mk.selective_scan_bwd),
    "scan_bwd_init": (lambda dt: _scan_bwd_args(dt, True), mk.selective_scan_bwd),
    "scan_update": (_scan_update_args, mk.selective_state_update),
    "scan_update_dt_proj": (_scan_update_dt_proj_args, mk.selective_state_update),
}


def _layout(t):
    return (tuple(t.shape), tuple(t.stride()), t.dtype) if isinstance(t, torch.Tensor) else t


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_real_results_have_the_fake_strides(case, dtype):
    make, op = CASES[case]
    torch.manual_seed(0)
    with torch.device(DEVICE):
        args = make(dtype)
        real = op(*args)
    with FakeTensorMode() as mode:
        fake_args = tree_map(lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t, args)
        fake = op(*fake_args)
    real_l, fake_l = tree_flatten(real)[0], tree_flatten(fake)[0]
    assert len(real_l) == len(fake_l)
    for i, (r, f) in enumerate(zip(real_l, fake_l)):
        assert _layout(r) == _layout(f), f"{case} result {i}: real {_layout(r)} vs fake {_layout(f)}"


@pytest.mark.parametrize(
    "case", ["ssd_fwd_z_init", "ssd_bwd", "ssd_bwd_z_init", "conv_bwd", "norm_bwd_gated"]
)
def test_opcheck_at_layer_shapes(case):
    make, op = CASES[case]
    torch.manual_seed(0)
    with torch.device(DEVICE):
        args = make(torch.float32)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
