"""The conv1d Triton backend's entry points: custom ops (traceable by `torch.compile`) with autograd.

`mambakit::causal_conv1d_fwd` / `_bwd` wrap the kernels; `mambakit::causal_conv1d_update` mutates the
conv state in place. Eager calls of the first two go through `EagerOp` (the same pieces without the
dispatcher). Optional results travel as empty tensors because custom ops cannot return None.
"""

from __future__ import annotations

import torch

from mambakit.ops._eager import EagerOp
from mambakit.ops.conv1d.triton import ops


def _conv_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    silu: bool,
    initial_state: torch.Tensor | None,
    store_final: bool,
    seq_idx: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return ops.conv_fwd(x, weight, bias, silu, initial_state, store_final, seq_idx)


_fwd_op = torch.library.custom_op("mambakit::causal_conv1d_fwd", _conv_fwd, mutates_args=())


@_fwd_op.register_fake
def _(x, weight, bias, silu, initial_state, store_final, seq_idx):
    batch, _, dim = x.shape
    final = x.new_empty(batch, dim, weight.shape[1] - 1) if store_final else x.new_empty(0)
    return torch.empty_like(x, memory_format=torch.contiguous_format), final


def _conv_bwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    silu: bool,
    initial_state: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
    dout: torch.Tensor,
    dfinal: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dw, db, dinit = ops.conv_bwd(x, weight, bias, silu, initial_state, seq_idx, dout, dfinal)
    return dx, dw, x.new_empty(0) if db is None else db, x.new_empty(0) if dinit is None else dinit


_bwd_op = torch.library.custom_op("mambakit::causal_conv1d_bwd", _conv_bwd, mutates_args=())


@_bwd_op.register_fake
def _(x, weight, bias, silu, initial_state, seq_idx, dout, dfinal):
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        weight.new_empty(weight.shape),
        x.new_empty(0) if bias is None else bias.new_empty(bias.shape),
        x.new_empty(0) if initial_state is None else initial_state.new_empty(initial_state.shape),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, silu, initial_state, store_final, seq_idx = inputs
    ctx.save_for_backward(x, weight, bias, initial_state, seq_idx)
    ctx.silu, ctx.store_final = silu, store_final


def _backward(ctx, dout, dfinal):
    x, weight, bias, initial_state, seq_idx = ctx.saved_tensors
    dfinal = dfinal if ctx.store_final else None
    dx, dw, db, dinit = _bwd(x, weight, bias, ctx.silu, initial_state, seq_idx, dout, dfinal)
    return (
        dx,
        dw,
        None if bias is None else db,
        None,
        None if initial_state is None else dinit,
        None,
        None,
    )


_fwd_op.register_autograd(_backward, setup_context=_setup_context)
_fwd = EagerOp(_fwd_op, _conv_fwd, _setup_context, _backward)
_bwd = EagerOp(_bwd_op, _conv_bwd)


@torch.library.custom_op("mambakit::causal_conv1d_update", mutates_args=("conv_state",))
def _update_op(
    x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool
) -> torch.Tensor:
    return ops.conv_update(x, conv_state, weight, bias, silu)


@_update_op.register_fake
def _(x, conv_state, weight, bias, silu):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def causal_conv1d_impl(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None,
    initial_state: torch.Tensor | None,
    return_final_state: bool,
    seq_idx: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x (batch, seqlen, dim); weight (dim, width); initial_state (batch, dim, width - 1).
    Returns out (batch, seqlen, dim) in x's dtype and the final state (batch, dim, width - 1) or None."""
    out, final = _fwd(x, weight, bias, activation == "silu", initial_state, return_final_state, seq_idx)
    return out, (final if return_final_state else None)


def causal_conv1d_update_impl(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None,
) -> torch.Tensor:
    """One step: x (batch, dim); conv_state (batch, dim, width - 1), shifted in place. Returns (batch, dim)"""
    return _update_op(x, conv_state, weight, bias, activation == "silu")
