"""Reference SSD (Mamba-2), written to be read: the definition the fast backends are tested against.

Two forms of the same map (Mamba-2 paper, "Transformers are SSMs", sections 3 and 4):
- `ssd_recurrent`: the linear recurrence over time, one step per position.
- `ssd_quadratic`: the semiseparable matrix ("masked attention") form, y = (L o C B^T) (delta x), with
  L[t, s] = exp(sum_{s<u<=t} delta_u A) for s <= t. It supports initial_state and seq_idx (a mask
  on L across documents) and returns the final state; cu_seqlens is handled by `ssd_impl` only.
Both take delta already processed (bias, softplus, clamp) and return y before the z gate.
`ssd_impl` (the backend entry) uses the recurrent form.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything else (bf16/fp16 are upcast)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def process_dt(
    dt: torch.Tensor,
    dt_bias: torch.Tensor | None,
    dt_softplus: bool,
    dt_limit: tuple[float, float],
    dtype: torch.dtype,
) -> torch.Tensor:
    """delta = clamp(softplus?(dt + dt_bias), *dt_limit); dt is (..., nheads), dt_bias (nheads,)."""
    delta = dt.to(dtype)
    if dt_bias is not None:
        delta = delta + dt_bias.to(dtype)
    if dt_softplus:
        delta = F.softplus(delta)
    if tuple(dt_limit) != (0.0, math.inf):
        delta = delta.clamp(dt_limit[0], dt_limit[1])
    return delta


def skip(y: torch.Tensor, x: torch.Tensor, D: torch.Tensor | None) -> torch.Tensor:
    """y + D * x with x (..., nheads, headdim) and D (nheads,) or (nheads, headdim)."""
    if D is None:
        return y
    D = D.to(y.dtype)
    return y + x * (D[:, None] if D.ndim == 1 else D)


def gate(y: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
    """y * silu(z), in y's dtype."""
    return y if z is None else y * F.silu(z.to(y.dtype))


def group_to_heads(B: torch.Tensor, nheads: int) -> torch.Tensor:
    """(..., ngroups, dstate) -> (..., nheads, dstate): head h reads group h // (nheads // ngroups)."""
    return B.repeat_interleave(nheads // B.shape[-2], dim=-2)


def ssd_recurrent(
    x: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence h_t = exp(delta_t A) h_{t-1} + delta_t x_t B_t^T,  y_t = h_t C_t + D x_t.

    x (batch, seqlen, nheads, headdim); delta (batch, seqlen, nheads); A (nheads,);
    B, C (batch, seqlen, ngroups, dstate); initial_state (batch, nheads, headdim, dstate);
    seq_idx (batch, seqlen): where the document id changes the state restarts from zero.
    Returns y (batch, seqlen, nheads, headdim) and the state after the last position.
    """
    batch, seqlen, nheads, headdim = x.shape
    B, C = group_to_heads(B, nheads), group_to_heads(C, nheads)  # (batch, seqlen, nheads, dstate)
    h = x.new_zeros(batch, nheads, headdim, B.shape[-1]) if initial_state is None else initial_state
    ys = []
    for t in range(seqlen):
        if seq_idx is not None and t > 0:
            h = h * (seq_idx[:, t] == seq_idx[:, t - 1]).to(h.dtype)[:, None, None, None]
        decay = torch.exp(delta[:, t] * A)[:, :, None, None]  # (batch, nheads, 1, 1)
        h = decay * h + torch.einsum("bhp,bhn->bhpn", delta[:, t, :, None] * x[:, t], B[:, t])
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C[:, t]))
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(x.shape)
    return skip(y, x, D), h


def segsum(a: torch.Tensor) -> torch.Tensor:
    """(..., T) -> (..., T, T) with out[..., t, s] = sum_{s<u<=t} a_u for s <= t and -inf above.

    Summed directly (a masked cumsum) rather than as cumsum[t] - cumsum[s], which would cancel
    catastrophically once the running sums grow large.
    """
    T = a.shape[-1]
    strict = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1)  # u > s
    sums = a[..., :, None].expand(*a.shape, T).masked_fill(~strict, 0.0).cumsum(dim=-2)
    causal = torch.ones(T, T, dtype=torch.bool, device=a.device).tril()
    return sums.masked_fill(~causal, -math.inf)


def ssd_quadratic(
    x: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same map as `ssd_recurrent`, as one (seqlen x seqlen) masked matrix per head.

    y = (L o C B^T) (delta x) + [initial-state term] + D x, where L = exp(segsum(delta A)) is lower
    triangular and, with seq_idx, zero between positions of different documents. The initial
    state reaches y_t through exp(sum_{u<=t} delta_u A) while t is still in the first document.
    Same shapes and returns as `ssd_recurrent`; memory grows as seqlen^2.
    """
    nheads = x.shape[2]
    B, C = group_to_heads(B, nheads), group_to_heads(C, nheads)  # (batch, seqlen, nheads, dstate)
    a = (delta * A).transpose(1, 2)  # (batch, nheads, seqlen)
    seg = segsum(a)  # (batch, nheads, seqlen, seqlen)
    if seq_idx is not None:
        same_doc = seq_idx[:, :, None] == seq_idx[:, None, :]  # (batch, seqlen, seqlen)
        seg = seg.masked_fill(~same_doc[:, None], -math.inf)
    L = torch.exp(seg)
    xdt = x * delta[..., None]  # (batch, seqlen, nheads, headdim)
    scores = torch.einsum("bthn,bshn->bhts", C, B) * L
    y = torch.einsum("bhts,bshp->bthp", scores, xdt)
    final = torch.einsum("bhs,bshp,bshn->bhpn", L[:, :, -1], xdt, B)  # the last row of L
    if initial_state is not None:
        decay0 = torch.exp(torch.cumsum(a, dim=-1))  # (batch, nheads, seqlen): exp(sum_{u<=t} a_u)
        if seq_idx is not None:
            decay0 = decay0 * (seq_idx == seq_idx[:, :1]).to(decay0.dtype)[:, None]
        y = y + torch.einsum("bht,bhpn,bthn->bthp", decay0, initial_state, C)
        final = final + decay0[:, :, -1, None, None] * initial_state
    return skip(y, x, D), final


def ssd_impl(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    dt_softplus: bool,
    dt_limit: tuple[float, float],
    initial_state: torch.Tensor | None,
    return_final_state: bool,
    seq_idx: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Backend entry (see `mambakit.ops.ssd.ssd`); chunk_size is ignored: there are no chunks here.

    With cu_seqlens each packed sequence runs alone from its own initial state (zeros if None).
    """
    dtype = compute_dtype(x)
    delta = process_dt(dt, dt_bias, dt_softplus, dt_limit, dtype)
    xs, As, Bs, Cs = x.to(dtype), A.to(dtype), B.to(dtype), C.to(dtype)
    Ds = None if D is None else D.to(dtype)
    h0 = None if initial_state is None else initial_state.to(dtype)
    if cu_seqlens is None:
        y, final = ssd_recurrent(xs, delta, As, Bs, Cs, Ds, h0, seq_idx)
    else:
        ys, finals = [], []
        bounds = cu_seqlens.tolist()
        for k, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            part = slice(start, end)
            yk, fk = ssd_recurrent(
                xs[:, part], delta[:, part], As, Bs[:, part], Cs[:, part], Ds,
                None if h0 is None else h0[k : k + 1],
            )  # fmt: skip
            ys.append(yk)
            finals.append(fk)
        y, final = torch.cat(ys, dim=1), torch.cat(finals, dim=0)
    y = gate(y, z).to(x.dtype)
    return y, (final if return_final_state else None)


def ssd_state_update_impl(
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
    dt_limit: tuple[float, float],
    A_is_log: bool = False,
) -> torch.Tensor:
    """One step of the recurrence; writes the new state into `state` (batch, nheads, headdim, dstate).

    x, z (batch, nheads, headdim); dt (batch, nheads); A (nheads,), or A_log when `A_is_log`
    (A = -exp(A_log)); B, C (batch, ngroups, dstate). Returns y (batch, nheads, headdim) in x's dtype.
    """
    dtype = compute_dtype(x)
    if A_is_log:
        A = -torch.exp(A.to(dtype))
    nheads = x.shape[1]
    delta = process_dt(dt, dt_bias, dt_softplus, dt_limit, dtype)  # (batch, nheads)
    Bh, Ch = group_to_heads(B.to(dtype), nheads), group_to_heads(C.to(dtype), nheads)
    xs = x.to(dtype)
    decay = torch.exp(delta * A.to(dtype))[:, :, None, None]
    h = decay * state.to(dtype) + torch.einsum("bhp,bhn->bhpn", delta[..., None] * xs, Bh)
    state.copy_(h)
    y = skip(torch.einsum("bhpn,bhn->bhp", h, Ch), xs, None if D is None else D.to(dtype))
    return gate(y, z).to(x.dtype)
