"""The norm Triton backend's entry points: two custom ops (forward, backward) behind the three norms.

`mambakit::rms_norm_fwd` covers plain, gated (grouped) and residual-add norms; `register_autograd` makes
it differentiable and `register_fake` lets `torch.compile` trace it; eager calls go through `EagerOp`
(the same pieces without the dispatcher). Optional results travel as empty tensors because custom ops
cannot return None.
"""

from __future__ import annotations

import torch

from mambakit.ops._eager import EagerOp
from mambakit.ops.norm.triton import ops


def _norm_fwd(
    x: torch.Tensor,
    z: torch.Tensor | None,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    group_size: int,
    norm_before_gate: bool,
    store_residual: bool,
    residual_in_fp32: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    res_dtype = _residual_dtype(x, store_residual, residual_in_fp32)
    y, res_out = ops.norm_fwd(x, z, residual, weight, eps, group_size, norm_before_gate, res_dtype)
    return y, x.new_empty(0) if res_out is None else res_out


def _residual_dtype(x: torch.Tensor, store: bool, in_fp32: bool) -> torch.dtype | None:
    if not store:
        return None
    return torch.promote_types(x.dtype, torch.float32) if in_fp32 else x.dtype


_fwd_op = torch.library.custom_op("mambakit::rms_norm_fwd", _norm_fwd, mutates_args=())


@_fwd_op.register_fake
def _(x, z, residual, weight, eps, group_size, norm_before_gate, store_residual, residual_in_fp32):
    res_dtype = _residual_dtype(x, store_residual, residual_in_fp32)
    res_out = x.new_empty(0) if res_dtype is None else x.new_empty(x.shape, dtype=res_dtype)
    return x.new_empty(x.shape), res_out


def _norm_bwd(
    dy: torch.Tensor,
    dres_out: torch.Tensor | None,
    x: torch.Tensor,
    z: torch.Tensor | None,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    group_size: int,
    norm_before_gate: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dz, dres, dw = ops.norm_bwd(dy, dres_out, x, z, residual, weight, eps, group_size, norm_before_gate)
    return dx, x.new_empty(0) if dz is None else dz, x.new_empty(0) if dres is None else dres, dw


_bwd_op = torch.library.custom_op("mambakit::rms_norm_bwd", _norm_bwd, mutates_args=())


@_bwd_op.register_fake
def _(dy, dres_out, x, z, residual, weight, eps, group_size, norm_before_gate):
    return (
        x.new_empty(x.shape),
        x.new_empty(0) if z is None else z.new_empty(z.shape),
        x.new_empty(0) if residual is None else residual.new_empty(residual.shape),
        weight.new_empty(weight.shape),
    )


def _setup_context(ctx, inputs, output):
    x, z, residual, weight, eps, group_size, norm_before_gate, store_residual, _ = inputs
    ctx.save_for_backward(x, z, residual, weight)
    ctx.eps, ctx.group_size, ctx.norm_before_gate, ctx.store_residual = (
        eps,
        group_size,
        norm_before_gate,
        store_residual,
    )


def _backward(ctx, dy, dres_out):
    x, z, residual, weight = ctx.saved_tensors
    dres_out = dres_out if ctx.store_residual else None
    dx, dz, dres, dw = _bwd(
        dy, dres_out, x, z, residual, weight, ctx.eps, ctx.group_size, ctx.norm_before_gate
    )
    return dx, None if z is None else dz, None if residual is None else dres, dw, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)
_fwd = EagerOp(_fwd_op, _norm_fwd, _setup_context, _backward)
_bwd = EagerOp(_bwd_op, _norm_bwd)


def rms_norm_impl(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., dim); weight (dim,). Returns (..., dim) in x's dtype."""
    return _fwd(x, None, None, weight, eps, x.shape[-1], False, False, False)[0]


def gated_rms_norm_impl(
    x: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    group_size: int,
    norm_before_gate: bool,
) -> torch.Tensor:
    """x, z (..., dim); weight (dim,); groups of `group_size` channels. Returns (..., dim) in x's dtype."""
    return _fwd(x, z, None, weight, eps, group_size, norm_before_gate, False, False)[0]


def add_rms_norm_impl(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    residual_in_fp32: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual (..., dim); weight (dim,). Returns (normed in x's dtype, x + residual in float32 if
    residual_in_fp32 else in x's dtype)."""
    return _fwd(x, None, residual, weight, eps, x.shape[-1], False, True, residual_in_fp32)
