"""Norm + linear (`ops.add_rms_norm_linear`, `ops.gated_rms_norm_linear`) against the reference.

The reference is the unfused composition (norm rounded to x's dtype, then F.linear). The Triton kernel
runs through the interpreter on CPU at small, odd shapes: rows 1..16 take the fused GEMV, more rows or
a recording autograd take the unfused path, and both must agree with the reference.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mambakit import ops
from mambakit.ops.norm import reference as norm_reference

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    # one bf16/fp16 rounding of the output (interpreter fp32->bf16 is not round-to-nearest-even)
    torch.bfloat16: dict(atol=2e-2, rtol=1.6e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}


def _inputs(rows, k, n, dtype, seed, bias=True):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(DEV, dtype)

    return dict(
        x=r(rows, 1, k),
        residual=(3 * torch.randn(rows, 1, k, generator=g)).to(DEV),  # float32 residual stream
        z=r(rows, 1, k),
        norm_weight=1 + r(k, scale=0.2),
        weight=r(n, k, scale=k**-0.5),
        bias=r(n) if bias else None,
    )


def _close(a, b, dtype):
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, **TOL[dtype])


def test_reference_is_the_unfused_composition():
    """The definition written out: residual sum, RMS over the last axis, weight, round, then x W^T + b."""
    t = _inputs(3, 24, 10, torch.float64, 0)
    residual = t["residual"].double()
    out, res = ops.add_rms_norm_linear(
        t["x"], residual, t["norm_weight"], t["weight"], t["bias"], 1e-6, True, backend="reference"
    )
    total = t["x"] + residual
    normed = total / torch.sqrt(total.pow(2).mean(-1, keepdim=True) + 1e-6) * t["norm_weight"]
    torch.testing.assert_close(res, total)
    torch.testing.assert_close(out, normed @ t["weight"].T + t["bias"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("residual_in_fp32", [False, True])
def test_torch_backend_matches_reference(dtype, with_residual, residual_in_fp32):
    t = _inputs(5, 40, 24, dtype, 1)
    res = t["residual"].to(dtype) if with_residual else None
    args = (t["x"], res, t["norm_weight"], t["weight"], t["bias"], 1e-5, residual_in_fp32)
    for a, b in zip(
        ops.add_rms_norm_linear(*args, backend="torch"), ops.add_rms_norm_linear(*args, backend="reference")
    ):
        _close(a, b, dtype)
    gated = (t["x"], t["z"], t["norm_weight"], t["weight"], t["bias"], 1e-5, 20, True)
    _close(
        ops.gated_rms_norm_linear(*gated, backend="torch"),
        ops.gated_rms_norm_linear(*gated, backend="reference"),
        dtype,
    )


SHAPES = [(1, 96, 40), (1, 130, 17), (3, 768, 100), (2, 64, 16), (16, 200, 33), (17, 48, 20)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,k,n", SHAPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_triton_add_norm_linear_matches_reference(dtype, rows, k, n, with_residual):
    t = _inputs(rows, k, n, dtype, rows * 1000 + k + n, bias=n % 2 == 0)
    res = t["residual"] if with_residual else None
    for residual_in_fp32 in (False, True):
        args = (t["x"], res, t["norm_weight"], t["weight"], t["bias"], 1e-5, residual_in_fp32)
        out, r_out = ops.add_rms_norm_linear(*args, backend="triton")
        ref, r_ref = ops.add_rms_norm_linear(*args, backend="reference")
        _close(out, ref, dtype)
        assert r_out.dtype == r_ref.dtype
        # a plain sum, rounded once: exact in float32; the interpreter's rounding to bf16/fp16 can be
        # one unit in the last place off round-to-nearest-even
        exact = r_ref.dtype == torch.float32
        torch.testing.assert_close(r_out, r_ref, rtol=0 if exact else 8e-3, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,k,n", SHAPES)
@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_triton_gated_norm_linear_matches_reference(dtype, rows, k, n, groups, norm_before_gate):
    if k % groups:
        pytest.skip("groups must divide k")
    t = _inputs(rows, k, n, dtype, 7 * rows + k + groups)
    x, z = t["x"][:, 0], t["z"][:, 0]
    args = (x, z, t["norm_weight"], t["weight"], t["bias"], 1e-5, k // groups, norm_before_gate)
    _close(
        ops.gated_rms_norm_linear(*args, backend="triton"),
        ops.gated_rms_norm_linear(*args, backend="reference"),
        dtype,
    )


def test_triton_reads_strided_rows():
    """Slices of a wider buffer (Mamba-2's z and y are views into in_proj's output)."""
    g = torch.Generator().manual_seed(3)
    buf = torch.randn(3, 200, generator=g).to(DEV)
    x, z = buf[:, :64], buf[:, 100:164]
    w, nw = torch.randn(40, 64, generator=g).to(DEV), torch.randn(64, generator=g).to(DEV)
    args = (x, z, nw, w, None, 1e-5, 32, False)
    _close(
        ops.gated_rms_norm_linear(*args, backend="triton"),
        ops.gated_rms_norm_linear(*args, backend="reference"),
        torch.float32,
    )


def test_triton_with_autograd_gives_reference_gradients():
    """A recording autograd takes the unfused path, whose gradients are the reference's."""
    t = _inputs(2, 48, 24, torch.float32, 5)
    leaves = [t["x"], t["norm_weight"], t["weight"]]
    for leaf in leaves:
        leaf.requires_grad_()
    grads = {}
    for backend in ("triton", "reference"):
        out, res = ops.add_rms_norm_linear(
            t["x"], t["residual"], t["norm_weight"], t["weight"], None, 1e-5, True, backend=backend
        )
        grads[backend] = torch.autograd.grad((out.square().sum() + res.sum()), leaves)
    for a, b in zip(grads["triton"], grads["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_norm_is_rounded_before_the_product():
    """bf16: the normed activations are rounded to bf16 first, exactly as norm then F.linear."""
    t = _inputs(1, 64, 32, torch.bfloat16, 9)
    normed, _ = norm_reference.add_rms_norm_impl(t["x"], None, t["norm_weight"], 1e-5, False)
    want = F.linear(normed.float(), t["weight"].float()).bfloat16()
    out, _ = ops.add_rms_norm_linear(t["x"], None, t["norm_weight"], t["weight"], backend="triton")
    torch.testing.assert_close(out.float(), want.float(), atol=2e-2, rtol=1.6e-2)


def test_bad_arguments_name_themselves():
    t = _inputs(2, 16, 8, torch.float32, 0)
    with pytest.raises(TypeError, match="weight must have x's dtype"):
        ops.add_rms_norm_linear(t["x"], None, t["norm_weight"], t["weight"].double())
    with pytest.raises(ValueError, match=r"weight must have shape \(\*, 16\)"):
        ops.add_rms_norm_linear(t["x"], None, t["norm_weight"], t["weight"][:, :8])
    with pytest.raises(ValueError, match="residual must have shape"):
        ops.add_rms_norm_linear(t["x"], t["residual"][:1], t["norm_weight"], t["weight"])
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.add_rms_norm_linear(t["x"], None, t["norm_weight"], t["weight"], t["bias"][:3])
    with pytest.raises(ValueError, match="group_size=5 must be positive and divide in_features=16"):
        ops.gated_rms_norm_linear(t["x"], t["z"], t["norm_weight"], t["weight"], group_size=5)
    with pytest.raises(ValueError, match="eps must be a positive float"):
        ops.add_rms_norm_linear(t["x"], None, t["norm_weight"], t["weight"], eps=0.0)
