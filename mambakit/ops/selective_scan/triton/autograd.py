"""Autograd and torch.compile wiring of the Triton selective scan.

The forward and backward launchers are registered as `torch.library.custom_op`s
(`mambakit::selective_scan_fwd` and `mambakit::selective_scan_bwd`) with fake implementations, so
`torch.compile` traces through them as opaque nodes; `register_autograd` connects them; eager calls go
through `EagerOp` (the same pieces without the dispatcher). Only the inputs
are saved for backward (all O(batch * seqlen * dim) or smaller); the backward recomputes the states.
"""

from typing import Optional

import torch

from mambakit.ops._eager import EagerOp
from mambakit.ops.selective_scan.triton.scan_bwd import selective_scan_bwd
from mambakit.ops.selective_scan.triton.scan_fwd import selective_scan_fwd

Tensor = torch.Tensor
_OptTensor = Optional[torch.Tensor]  # noqa: UP045 (the op schema is inferred from these annotations)


def _state_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _scan_fwd_impl(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: _OptTensor,
    z: _OptTensor,
    dt_bias: _OptTensor,
    dt_softplus: bool,
    initial_state: _OptTensor,
    seq_idx: _OptTensor,
) -> tuple[Tensor, Tensor]:
    return selective_scan_fwd(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, seq_idx)


_scan_fwd_op = torch.library.custom_op("mambakit::selective_scan_fwd", _scan_fwd_impl, mutates_args=())


@_scan_fwd_op.register_fake
def _(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, seq_idx):
    batch, _, dim = x.shape
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return y, x.new_empty((batch, dim, A.shape[1]), dtype=_state_dtype(x))


def _scan_bwd_impl(
    dy: Tensor,
    dfinal: _OptTensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: _OptTensor,
    z: _OptTensor,
    dt_bias: _OptTensor,
    dt_softplus: bool,
    initial_state: _OptTensor,
    seq_idx: _OptTensor,
) -> list[Tensor]:
    grads = selective_scan_bwd(dy, dfinal, x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, seq_idx)
    # Custom ops return tensors only: an absent input gets an empty placeholder gradient.
    return [g if g is not None else x.new_empty(0) for g in grads]


_scan_bwd_op = torch.library.custom_op("mambakit::selective_scan_bwd", _scan_bwd_impl, mutates_args=())


@_scan_bwd_op.register_fake
def _(dy, dfinal, x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, seq_idx):
    def like(t):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if t is not None else x.new_empty(0)

    return [like(t) for t in (x, dt, A, B, C, D, z, dt_bias, initial_state)]


def _setup_context(ctx, inputs, output):
    x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, seq_idx = inputs
    ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx)
    ctx.dt_softplus = dt_softplus


def _backward(ctx, dy, dfinal):
    x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(x)
    grads = _scan_bwd(dy, dfinal, x, dt, A, B, C, D, z, dt_bias, ctx.dt_softplus, initial_state, seq_idx)
    present = (x, dt, A, B, C, D, z, dt_bias, initial_state)
    dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dh0 = (
        g if t is not None else None for g, t in zip(grads, present)
    )
    return dx, ddt, dA, dB, dC, dD, dz, ddt_bias, None, dh0, None


_scan_fwd_op.register_autograd(_backward, setup_context=_setup_context)
_scan_fwd = EagerOp(_scan_fwd_op, _scan_fwd_impl, _setup_context, _backward)
_scan_bwd = EagerOp(_scan_bwd_op, _scan_bwd_impl)


def selective_scan_impl(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: _OptTensor,
    z: _OptTensor,
    dt_bias: _OptTensor,
    dt_softplus: bool,
    initial_state: _OptTensor,
    return_final_state: bool,
    seq_idx: _OptTensor,
) -> tuple[Tensor, _OptTensor]:
    """Triton backend of `mambakit.ops.selective_scan` (same arguments minus `backend`, already checked).

    Returns y (batch, seqlen, dim) in x's dtype and the final state (batch, dim, dstate) in float32, or None
    when not return_final_state.
    """
    y, final = _scan_fwd(x, dt, A, B, C, D, z, dt_bias, bool(dt_softplus), initial_state, seq_idx)
    return y, (final if return_final_state else None)
