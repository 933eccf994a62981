"""Reference Mamba-1 selective scan (S6): the sequential recurrence, written to be checked by eye.

This file is the definition the faster backends are tested against (values and gradients), so it
favours plain steps over speed. Notation follows the Mamba paper (Gu & Dao, 2023), Algorithm 2 with
zero-order hold as in its implementation:

    delta_t = softplus(dt_t + dt_bias)            (or dt_t + dt_bias without softplus)
    dA_t    = exp(delta_t * A)                    (dim, dstate)
    dBx_t   = delta_t * B_t * x_t                 (dim, dstate)
    h_t     = dA_t * h_{t-1} + dBx_t
    y_t     = C_t . h_t + D * x_t,   then y_t *= silu(z_t)

Everything is computed in float32 (float64 when any input is float64); y is returned in x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def accumulation_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any given tensor is float64, else float32: the precision the recurrence runs in."""
    return (
        torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
    )


def discretize_dt(dt: torch.Tensor, dt_bias: torch.Tensor | None, dt_softplus: bool, dtype: torch.dtype):
    """delta = softplus(dt + dt_bias) (or without softplus), in `dtype`; any shape ending in dim."""
    delta = dt.to(dtype)
    if dt_bias is not None:
        delta = delta + dt_bias.to(dtype)
    return F.softplus(delta) if dt_softplus else delta


def _step(
    h: torch.Tensor,
    x_t: torch.Tensor,
    delta_t: torch.Tensor,
    A: torch.Tensor,
    B_t: torch.Tensor,
    C_t: torch.Tensor,
    D: torch.Tensor | None,
    z_t: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the recurrence, all in one dtype.

    h (batch, dim, dstate); x_t, delta_t, z_t (batch, dim); A (dim, dstate); B_t, C_t (batch, ngroups,
    dstate). Returns the new state h_t and y_t (batch, dim).
    """
    dim, ngroups = x_t.shape[1], B_t.shape[1]
    # Channel d reads group d // (dim // ngroups): repeat each group's B, C for its channels.
    B_t = B_t.repeat_interleave(dim // ngroups, dim=1)  # (batch, dim, dstate)
    C_t = C_t.repeat_interleave(dim // ngroups, dim=1)
    dA = torch.exp(delta_t[:, :, None] * A)
    dBx = delta_t[:, :, None] * B_t * x_t[:, :, None]
    h = dA * h + dBx
    y_t = (C_t * h).sum(-1)
    if D is not None:
        y_t = y_t + D * x_t
    if z_t is not None:
        y_t = y_t * F.silu(z_t)
    return h, y_t


def selective_scan_impl(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    dt_softplus: bool,
    initial_state: torch.Tensor | None,
    return_final_state: bool,
    seq_idx: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sequential selective scan; arguments and shapes as in `mambakit.ops.selective_scan`.

    x, dt, z (batch, seqlen, dim); A (dim, dstate); B, C (batch, seqlen, ngroups, dstate);
    D, dt_bias (dim,); initial_state (batch, dim, dstate); seq_idx (batch, seqlen).
    Returns y (batch, seqlen, dim) in x's dtype and the final state (batch, dim, dstate) in the
    accumulation dtype (or None).
    """
    acc = accumulation_dtype(x, dt, A, B, C, D, z, dt_bias, initial_state)
    batch, seqlen, dim = x.shape
    dstate = A.shape[1]
    delta = discretize_dt(dt, dt_bias, dt_softplus, acc)
    if initial_state is None:
        h = torch.zeros(batch, dim, dstate, dtype=acc, device=x.device)
    else:
        h = initial_state.to(acc)
    ys = []
    for t in range(seqlen):
        if seq_idx is not None and t > 0:
            # A new document starts at t: the state carried into it is zero.
            new_doc = seq_idx[:, t] != seq_idx[:, t - 1]  # (batch,)
            h = torch.where(new_doc[:, None, None], torch.zeros_like(h), h)
        h, y_t = _step(
            h,
            x[:, t].to(acc),
            delta[:, t],
            A.to(acc),
            B[:, t].to(acc),
            C[:, t].to(acc),
            None if D is None else D.to(acc),
            None if z is None else z[:, t].to(acc),
        )
        ys.append(y_t)
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(batch, 0, dim, dtype=acc)
    return y.to(x.dtype), (h if return_final_state else None)


def selective_state_update_impl(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    dt_softplus: bool,
    A_is_log: bool = False,
    dt_proj_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decoding step: advances `state` (batch, dim, dstate) in place and returns y (batch, dim).

    x, dt, z (batch, dim); A (dim, dstate), or A_log when `A_is_log` (A = -exp(A_log));
    B, C (batch, ngroups, dstate); D, dt_bias (dim,). With dt_proj_weight (dim, dt_rank), dt is
    (batch, dt_rank) and the step's dt is dt @ dt_proj_weight^T.
    """
    acc = accumulation_dtype(state, x, dt, A, B, C, D, z, dt_bias, dt_proj_weight)
    if A_is_log:
        A = -torch.exp(A.to(acc))
    if dt_proj_weight is not None:
        dt = dt.to(acc) @ dt_proj_weight.to(acc).T
    delta = discretize_dt(dt, dt_bias, dt_softplus, acc)
    h, y = _step(
        state.to(acc),
        x.to(acc),
        delta,
        A.to(acc),
        B.to(acc),
        C.to(acc),
        None if D is None else D.to(acc),
        None if z is None else z.to(acc),
    )
    state.copy_(h)
    return y.to(x.dtype)
