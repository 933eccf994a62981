"""`mamba1_block_step`: a whole Mamba-1 block's decoding step as one op. Every backend must equal the
block's unfused step (the reference composes the reference step ops with the same roundings), on
fresh random inputs, at sizes that do not fill the kernels' tiles; the Triton kernels run through the
interpreter on CPU (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

from mambakit.ops import mamba1_block_step

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(gen, batch, d_model, d_inner, dstate, dt_rank, d_conv, dtype, first=False, conv_bias=True,
            half_state=False):  # fmt: skip
    def r(*shape, scale=1.0, shift=0.0, dt=dtype):
        return (torch.randn(*shape, generator=gen) * scale + shift).to(dt).to(DEVICE)

    return dict(
        hidden=r(batch, d_model),
        residual=None if first else r(batch, d_model, dt=torch.float32),
        norm_weight=r(d_model, scale=0.2, shift=1.0),
        norm_eps=1e-5,
        residual_in_fp32=True,
        in_proj_weight=r(2 * d_inner, d_model, scale=d_model**-0.5),
        conv_state=r(batch, d_inner, d_conv - 1),
        conv_weight=r(d_inner, d_conv, scale=0.5),
        conv_bias=r(d_inner, scale=0.1) if conv_bias else None,
        x_proj_weight=r(dt_rank + 2 * dstate, d_inner, scale=d_inner**-0.5),
        dt_proj_weight=r(d_inner, dt_rank, scale=dt_rank**-0.5),
        dt_bias=r(d_inner, scale=0.3, shift=-2.0),
        A_log=torch.log(torch.rand(d_inner, dstate, generator=gen) * 4 + 0.5).to(DEVICE),
        D=r(d_inner, dt=torch.float32),
        ssm_state=r(batch, d_inner, dstate, dt=torch.bfloat16 if half_state else torch.float32),
        out_proj_weight=r(d_model, d_inner, scale=d_inner**-0.5),
    )


def _run(args, backend):
    args = dict(args, conv_state=args["conv_state"].clone(), ssm_state=args["ssm_state"].clone())  # mutated
    with torch.no_grad():
        out, res = mamba1_block_step(**args, backend=backend)
    return out, res, args["conv_state"], args["ssm_state"]


SHAPES = [  # batch, d_model, d_inner, dstate, dt_rank, d_conv
    (1, 32, 64, 16, 2, 4),
    (3, 24, 48, 5, 3, 4),
    (2, 40, 200, 8, 7, 3),
    (1, 300, 96, 16, 19, 2),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_step_matches_reference(backend, shape, dtype):
    batch, d_model, d_inner, dstate, dt_rank, d_conv = shape
    gen = torch.Generator().manual_seed(sum(shape))
    args = _inputs(gen, batch, d_model, d_inner, dstate, dt_rank, d_conv, dtype)
    want = _run(args, "reference")
    got = _run(args, backend)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for name, w, g in zip(("out", "residual", "conv_state", "ssm_state"), want, got):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, w, **tol, msg=lambda m, n=name: f"{n}: {m}")
    assert not torch.equal(got[3], args["ssm_state"])  # the state advanced


@pytest.mark.parametrize("first,conv_bias,half_state", [(True, True, False), (False, False, True)])
def test_block_step_options(first, conv_bias, half_state):
    gen = torch.Generator().manual_seed(7)
    args = _inputs(gen, 2, 32, 80, 16, 3, 4, torch.float32, first, conv_bias, half_state)
    args["residual_in_fp32"] = not first
    want = _run(args, "reference")
    got = _run(args, "triton")
    for w, g in zip(want, got):
        assert g.dtype == w.dtype
        # a bfloat16 state is stored rounded: one rounding step apart where the float32 values differ
        tol = dict(rtol=8e-3, atol=1e-5) if g.dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(g, w, **tol)


def test_block_step_takes_strided_inputs():
    """Views with strides (a slice of a larger tensor) give the same result as contiguous copies."""
    gen = torch.Generator().manual_seed(11)
    args = _inputs(gen, 2, 32, 48, 8, 3, 4, torch.float32)
    strided = dict(args)
    for key in ("norm_weight", "conv_bias", "dt_bias", "D", "hidden"):
        wide = torch.stack([args[key], torch.full_like(args[key], float("nan"))], dim=-1)
        strided[key] = wide[..., 0]  # stride 2 on the last axis
        assert not strided[key].is_contiguous()
    want = _run(args, "reference")
    for w, g in zip(want, _run(strided, "triton")):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_block_step_rejects_bad_input():
    gen = torch.Generator().manual_seed(0)
    args = _inputs(gen, 2, 32, 64, 16, 2, 4, torch.float32)
    bad = dict(args, conv_state=args["conv_state"][:, :, :2])
    with pytest.raises(ValueError, match="conv_state"):
        mamba1_block_step(**bad)
    bad = dict(args, x_proj_weight=args["x_proj_weight"][:-1])
    with pytest.raises(ValueError, match="x_proj_weight"):
        mamba1_block_step(**bad)
    bad = dict(args, in_proj_weight=args["in_proj_weight"].double())
    with pytest.raises(TypeError, match="in_proj_weight"):
        mamba1_block_step(**bad)
    with pytest.raises(ValueError, match="no_grad"):
        mamba1_block_step(**dict(args, hidden=args["hidden"].requires_grad_()))


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d_model", [768, 2048])
def test_block_step_gpu_preset_shapes(batch, dtype, d_model):
    """The 130M and 1.4B presets' block shapes (d_inner 2 d_model, dstate 16, dt_rank d_model / 16)."""
    gen = torch.Generator().manual_seed(batch + d_model)
    args = _inputs(gen, batch, d_model, 2 * d_model, 16, d_model // 16, 4, dtype)
    want = _run(args, "reference")
    got = _run(args, "triton")
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for w, g in zip(want, got):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, **tol)


def chain_block_steps(op, args, layers, backend):
    """`layers` steps of a block-step op back to back, each on the previous one's output and residual
    (own states): under programmatic dependent launch each kernel starts while the previous one
    drains. Returns the last output and residual and every layer's states."""
    out, res = args["hidden"], args["residual"]
    states = [(args["conv_state"].clone(), args["ssm_state"].clone()) for _ in range(layers)]
    with torch.no_grad():
        for conv, ssm in states:
            step = dict(args, hidden=out, residual=res, conv_state=conv, ssm_state=ssm)
            out, res = op(**step, backend=backend)
    return [out, res] + [s for pair in states for s in pair]


def check_pdl_equals_plain_launches(op, args, layers=6):
    """A chain of Triton block steps computes exactly the same under PDL as launched plainly, and both
    are the block steps (the reference chain, bf16 six deep, within 5% of its scale)."""
    from mambakit.ops import _launch

    try:
        _launch.LAUNCH["pdl"] = False
        plain = chain_block_steps(op, args, layers, "triton")
        _launch.LAUNCH["pdl"] = True
        pdl = chain_block_steps(op, args, layers, "triton")
    finally:
        _launch.LAUNCH["pdl"] = True
    for p, q in zip(plain, pdl):
        assert torch.equal(p, q)
    want = chain_block_steps(op, args, layers, "reference")[0].float()
    assert (pdl[0].float() - want).abs().max() <= 0.05 * want.abs().max()


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("d_model", [768, 2560])
def test_block_step_gpu_pdl_equals_plain_launches(batch, d_model):
    """With programmatic dependent launch (ops/_launch.py) the kernels compute exactly what they do
    launched plainly, over a chain of steps (d_model 2560: out_proj's input row, 5120, is a loop)."""
    gen = torch.Generator().manual_seed(d_model)
    args = _inputs(gen, batch, d_model, 2 * d_model, 16, d_model // 16, 4, torch.bfloat16)
    check_pdl_equals_plain_launches(mamba1_block_step, args)
