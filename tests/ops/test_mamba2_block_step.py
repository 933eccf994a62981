"""`mamba2_block_step`: a whole Mamba-2 block's decoding step as one op. Every backend must equal the
block's unfused step (the reference composes the reference step ops with the same roundings), on
fresh random inputs, at sizes that do not fill the kernels' tiles (ngroups > 1, headdim and dstate not
powers of two, several norm groups, D per head and per channel, dt_limit); the Triton kernels run
through the interpreter on CPU (tests/conftest.py)."""

from __future__ import annotations

import math

import pytest
import torch

from mambakit.ops import mamba2_block_step
from tests.ops.test_mamba1_block_step import check_pdl_equals_plain_launches

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(gen, batch, d_model, nheads, headdim, dstate, ngroups, d_conv, dtype, *, first=False,
            conv_bias=True, half_state=False, d_per_channel=False, norm_groups=1, norm_before_gate=False,
            dt_limit=(0.0, math.inf)):  # fmt: skip
    def r(*shape, scale=1.0, shift=0.0, dt=dtype):
        return (torch.randn(*shape, generator=gen) * scale + shift).to(dt).to(DEVICE)

    d_inner = nheads * headdim
    conv_dim = d_inner + 2 * ngroups * dstate
    return dict(
        hidden=r(batch, d_model),
        residual=None if first else r(batch, d_model, dt=torch.float32),
        norm_weight=r(d_model, scale=0.2, shift=1.0),
        norm_eps=1e-5,
        residual_in_fp32=True,
        in_proj_weight=r(d_inner + conv_dim + nheads, d_model, scale=d_model**-0.5),
        conv_state=r(batch, conv_dim, d_conv - 1),
        conv_weight=r(conv_dim, d_conv, scale=0.5),
        conv_bias=r(conv_dim, scale=0.1) if conv_bias else None,
        dt_bias=r(nheads, scale=0.3, shift=-2.0, dt=torch.float32),
        A_log=torch.log(torch.rand(nheads, generator=gen) * 8 + 1).to(DEVICE),
        D=r(nheads, headdim, dt=torch.float32) if d_per_channel else r(nheads, dt=torch.float32),
        dt_limit=dt_limit,
        ssm_state=r(batch, nheads, headdim, dstate, dt=torch.bfloat16 if half_state else torch.float32),
        ngroups=ngroups,
        gate_norm_weight=r(d_inner, scale=0.2, shift=1.0),
        gate_norm_eps=1e-5,
        gate_group_size=d_inner // norm_groups,
        norm_before_gate=norm_before_gate,
        out_proj_weight=r(d_model, d_inner, scale=d_inner**-0.5),
    )


def _run(args, backend):
    args = dict(args, conv_state=args["conv_state"].clone(), ssm_state=args["ssm_state"].clone())  # mutated
    with torch.no_grad():
        out, res = mamba2_block_step(**args, backend=backend)
    return out, res, args["conv_state"], args["ssm_state"]


def _check(want, got, dtype):
    for name, w, g in zip(("out", "residual", "conv_state", "ssm_state"), want, got):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert torch.isfinite(g).all(), name
        if dtype == torch.float32:  # a bfloat16 state is stored rounded: one rounding step apart
            t = dict(rtol=8e-3, atol=1e-5) if g.dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
        else:  # several bfloat16 roundings in a row (as in the unfused step): relative to the scale
            t = dict(rtol=2e-2, atol=2e-2 * w.abs().max().item())
        torch.testing.assert_close(g, w, **t, msg=lambda m, n=name: f"{n}: {m}")


SHAPES = [  # batch, d_model, nheads, headdim, dstate, ngroups, d_conv
    (1, 32, 4, 16, 16, 1, 4),
    (3, 24, 6, 8, 5, 2, 4),
    (2, 40, 4, 20, 12, 4, 3),
    (1, 300, 2, 24, 8, 1, 2),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_step_matches_reference(backend, shape, dtype):
    gen = torch.Generator().manual_seed(sum(shape))
    args = _inputs(gen, *shape, dtype)
    got = _run(args, backend)
    _check(_run(args, "reference"), got, dtype)
    assert not torch.equal(got[3], args["ssm_state"])  # the state advanced


@pytest.mark.parametrize(
    "options",
    [
        dict(first=True, d_per_channel=True, norm_groups=2),
        dict(conv_bias=False, half_state=True, norm_before_gate=True, dt_limit=(0.05, 0.2)),
        dict(norm_groups=4, dt_limit=(0.0, 0.1)),
    ],
)
def test_block_step_options(options):
    gen = torch.Generator().manual_seed(7)
    args = _inputs(gen, 2, 32, 4, 12, 16, 2, 4, torch.float32, **options)
    args["residual_in_fp32"] = not options.get("first", False)
    _check(_run(args, "reference"), _run(args, "triton"), torch.float32)


def test_block_step_takes_strided_inputs():
    """Views with strides (a slice of a larger tensor) give the same result as contiguous copies."""
    gen = torch.Generator().manual_seed(11)
    args = _inputs(gen, 2, 32, 4, 12, 16, 2, 4, torch.float32)
    strided = dict(args)
    for key in ("norm_weight", "conv_bias", "dt_bias", "A_log", "D", "gate_norm_weight", "hidden"):
        wide = torch.stack([args[key], torch.full_like(args[key], float("nan"))], dim=-1)
        strided[key] = wide[..., 0]  # stride 2 on the last axis
        assert not strided[key].is_contiguous()
    _check(_run(args, "reference"), _run(strided, "triton"), torch.float32)


def test_block_step_rejects_bad_input():
    gen = torch.Generator().manual_seed(0)
    args = _inputs(gen, 2, 32, 4, 16, 16, 1, 4, torch.float32)
    for key, value, err in [
        ("conv_state", args["conv_state"][:, :-1], ValueError),
        ("in_proj_weight", args["in_proj_weight"][:-1], ValueError),
        ("ngroups", 3, ValueError),
        ("gate_group_size", 5, ValueError),
        ("dt_limit", (0.3, 0.1), ValueError),
        ("out_proj_weight", args["out_proj_weight"].double(), TypeError),
    ]:
        with pytest.raises(err, match=key):
            mamba2_block_step(**dict(args, **{key: value}))
    with pytest.raises(ValueError, match="no_grad"):
        mamba2_block_step(**dict(args, hidden=args["hidden"].requires_grad_()))


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d_model", [768, 2048])
def test_block_step_gpu_preset_shapes(batch, dtype, d_model):
    """The 130M and 1.3B presets' block shapes (headdim 64, dstate 128, one group)."""
    gen = torch.Generator().manual_seed(batch + d_model)
    args = _inputs(gen, batch, d_model, 2 * d_model // 64, 64, 128, 1, 4, dtype)
    _check(_run(args, "reference"), _run(args, "triton"), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("d_model", [768, 2560])
def test_block_step_gpu_pdl_equals_plain_launches(batch, d_model):
    """With programmatic dependent launch (ops/_launch.py) the kernels compute exactly what they do
    launched plainly, over a chain of steps."""
    gen = torch.Generator().manual_seed(d_model)
    args = _inputs(gen, batch, d_model, 2 * d_model // 64, 64, 128, 1, 4, torch.bfloat16)
    check_pdl_equals_plain_launches(mamba2_block_step, args)
