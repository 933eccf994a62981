"""Chunked, vectorized PyTorch backend of the Mamba-1 selective scan (S6); autograd by PyTorch.

Same math as `reference.py`. Time is cut into chunks; for each chunk the decays dA = exp(delta * A)
and inputs dBx = delta * B * x of all its steps are computed at once as (chunk, batch, dim, dstate)
tensors, then the recurrence h_t = dA_t * h_{t-1} + dBx_t runs one fused multiply-add per step and
y_t = C_t . h_t is one small matmul. Decays are applied one step at a time, as in the recurrence
(no exp of cumulative sums, no division by decays), so the scan is as stable as the recurrence. No
(batch, seqlen, dim, dstate) tensor exists for the whole sequence at once.

Two paths:
- forward only (no autograd): chunk buffers are reused and updated in place;
- autograd: the same steps out of place, and for large inputs each chunk is recomputed in the
  backward pass (activation checkpointing) so memory kept for backward is O(seqlen * dim).

Measured and rejected on the 2-core CPU (fp32, (1, 256..2048, 1536, 16)): a two-level scan (all
chunks at once from zero, then a short scan over chunk starts, then exp(A * cumsum(delta)) to
combine; Python loops chunk + seqlen / chunk instead of seqlen) was about 2x slower forward (~50 vs
~23 ms CPU at seqlen 1024) and 1.5-2x slower forward+backward: it makes ~3x more passes over
(seqlen, dim, dstate) tensors, and this machine is bound by memory traffic, not by per-op overhead.
A log-depth (Hillis-Steele) scan inside chunks was 5-30x slower for the same reason.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mambakit.ops.selective_scan.reference import accumulation_dtype, discretize_dt
from mambakit.ops.selective_scan.reference import selective_state_update_impl as _reference_update

# Steps whose dA, dBx are computed at once (autograd path; one checkpointed unit when recomputing).
# fp32 forward+backward at (1, 256, 1536, 16) on one core: 16 -> 96 ms, 32 -> 69 ms, 64 -> 96 ms,
# 256 -> 153 ms (min of 4; the machine is shared, so +-30%): 32 keeps a chunk's tensors (3 MB each
# at dim 1536) in cache while amortizing the per-chunk ops.
CHUNK = 32
# Buffer length of the forward-only path, same trade-off: forward (1, 1024, 1536, 16) on one core,
# 16 -> 25 ms, 32 -> 22 ms, 64 -> 23 ms.
FORWARD_CHUNK = 32
# With autograd, checkpoint chunks once batch * seqlen * dim * dstate exceeds this (64 MB of fp32 per
# saved tensor); below it, keeping the activations is ~1.5x faster than recomputing them.
RECOMPUTE_ABOVE = 2**24
# exp(v) = exp2(v * log2(e)); PyTorch's CPU exp2 is several times faster than exp on float32.
_LOG2E = 1.0 / math.log(2.0)


def _forward_only(
    x: torch.Tensor,
    dt: torch.Tensor,
    A2: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    dt_softplus: bool,
    h: torch.Tensor,
    reset: torch.Tensor | None,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole scan without autograd, one chunk of steps at a time in reused buffers.

    Arguments as `selective_scan_impl` (A2 = A * log2(e); h the float32/64 state to start from;
    reset (batch, seqlen) bool or None). Every step, including dt's discretization, D and the gate,
    works on (chunk, batch, dim[, dstate]) buffers allocated once: on this CPU, fresh memory for each
    whole-sequence op (page faults) cost more than the arithmetic.
    """
    batch, length, dim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    group_size = dim // ngroups
    acc, dev = h.dtype, x.device
    x_b = torch.empty(chunk, batch, dim, dtype=acc, device=dev)
    delta_b, tmp_b = torch.empty_like(x_b), torch.empty_like(x_b)
    B_b = torch.empty(chunk, batch, ngroups, dstate, dtype=acc, device=dev)
    C_b = torch.empty_like(B_b)
    dA = torch.empty(chunk, batch, dim, dstate, dtype=acc, device=dev)
    hs = torch.empty_like(dA)  # dBx, then overwritten in place by the states
    y = torch.empty(batch, length, dim, dtype=x.dtype, device=dev)
    bias = None if dt_bias is None else dt_bias.to(acc)
    D_acc = None if D is None else D.to(acc)
    h = h.clone()
    for s in range(0, length, chunk):
        e = min(s + chunk, length)
        n = e - s
        xc, delta, tmp, Bc, Cc = x_b[:n], delta_b[:n], tmp_b[:n], B_b[:n], C_b[:n]
        xc.copy_(x[:, s:e].transpose(0, 1))  # time-major (n, batch, dim)
        delta.copy_(dt[:, s:e].transpose(0, 1))
        Bc.copy_(B[:, s:e].transpose(0, 1))
        Cc.copy_(C[:, s:e].transpose(0, 1))
        if bias is not None:
            delta.add_(bias)
        if dt_softplus:
            delta = F.softplus(delta)
        a, u = dA[:n], hs[:n]
        torch.mul(delta[:, :, :, None], A2, out=a)
        a.exp2_()
        if reset is not None:
            a.masked_fill_(reset[:, s:e].transpose(0, 1)[:, :, None, None], 0.0)
        torch.mul(delta, xc, out=tmp)
        torch.mul(
            tmp.view(n, batch, ngroups, group_size, 1),
            Bc.view(n, batch, ngroups, 1, dstate),
            out=u.view(n, batch, ngroups, group_size, dstate),
        )
        prev = h
        for t in range(n):
            prev = u[t].addcmul_(a[t], prev)
        h.copy_(prev)
        nb = n * batch * ngroups
        # y = C . h as (1, dstate) @ (dstate, group_size): ~3x faster on CPU than h @ C, same numbers.
        torch.bmm(
            Cc.reshape(nb, 1, dstate),
            u.view(nb, group_size, dstate).transpose(1, 2),
            out=tmp.view(nb, 1, group_size),
        )
        if D_acc is not None:
            tmp.addcmul_(xc, D_acc)
        if z is not None:
            tmp.mul_(F.silu(z[:, s:e].transpose(0, 1).to(acc)))
        y[:, s:e].copy_(tmp.transpose(0, 1))
    return y, h


def _scan_chunk(
    h: torch.Tensor,
    delta: torch.Tensor,
    x: torch.Tensor,
    A2: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    reset: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scan a few steps out of place, for autograd.

    h (batch, dim, dstate) state before the chunk; delta, x (batch, L, dim); A2 = A * log2(e)
    (dim, dstate); B, C (batch, L, ngroups, dstate); reset (batch, L) bool, True where the state
    carried into t is zero. Returns y (batch, L, dim) without D / z, and the state after the chunk.
    """
    batch, length, dim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    group_size = dim // ngroups
    nb = batch * ngroups
    delta_t = delta.transpose(0, 1).contiguous()  # (length, batch, dim)
    dx_t = (delta * x).transpose(0, 1).contiguous()
    B_t = B.transpose(0, 1).contiguous()  # (length, batch, ngroups, dstate)
    C_t = C.transpose(0, 1).reshape(length, nb, 1, dstate)
    dA = torch.exp2(delta_t[..., None] * A2)  # (length, batch, dim, dstate)
    if reset is not None:
        dA = torch.where(reset.transpose(0, 1)[:, :, None, None], 0.0, dA)
    dBx = dx_t.view(length, batch, ngroups, group_size, 1) * B_t.unsqueeze(3)
    dBx = dBx.view(length, batch, dim, dstate)
    ys = []
    # unbind, not dA[t]: the backward of each indexed view would scatter into a zeros tensor of the
    # whole chunk, making the backward quadratic in the chunk length.
    for a_t, u_t, c_t in zip(dA.unbind(0), dBx.unbind(0), C_t.unbind(0)):
        h = torch.addcmul(u_t, a_t, h)
        ys.append(torch.bmm(c_t, h.view(nb, group_size, dstate).transpose(1, 2)))
    y = torch.stack(ys).view(length, batch, dim).transpose(0, 1)
    return y, h


def _scan_with_grad(
    h: torch.Tensor,
    delta: torch.Tensor,
    x: torch.Tensor,
    A2: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    reset: torch.Tensor | None,
    chunk: int,
    recompute: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scan recorded by autograd, chunk by chunk (`_scan_chunk`), optionally checkpointed.

    Same arguments as `_scan_chunk` plus the chunk length, any seqlen. Returns y (batch, seqlen, dim)
    and the final state.
    """
    batch, seqlen, dim = x.shape
    ys = []
    for s in range(0, seqlen, chunk):
        e = min(s + chunk, seqlen)
        args = (
            h,
            delta[:, s:e],
            x[:, s:e],
            A2,
            B[:, s:e],
            C[:, s:e],
            None if reset is None else reset[:, s:e],
        )
        if recompute:
            y_chunk, h = checkpoint(_scan_chunk, *args, use_reentrant=False)
        else:
            y_chunk, h = _scan_chunk(*args)
        ys.append(y_chunk)
    y = torch.cat(ys, dim=1) if ys else x.new_zeros(batch, 0, dim)
    return y, h


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
    *,
    chunk_size: int = CHUNK,
    recompute: bool | None = None,
    forward_chunk: int = FORWARD_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked selective scan; arguments and shapes as in `mambakit.ops.selective_scan`.

    x, dt, z (batch, seqlen, dim); A (dim, dstate); B, C (batch, seqlen, ngroups, dstate);
    D, dt_bias (dim,); initial_state (batch, dim, dstate); seq_idx (batch, seqlen).
    Returns y (batch, seqlen, dim) in x's dtype and the final state (batch, dim, dstate) in float32
    (float64 for float64 inputs), or None.

    Keyword-only knobs (tests and benchmarks): when autograd records the scan, `chunk_size` and
    `recompute` (checkpoint each chunk; None: above RECOMPUTE_ABOVE elements); otherwise
    `forward_chunk`, the buffer length of the forward-only path.
    """
    acc = accumulation_dtype(x, dt, A, B, C, D, z, dt_bias, initial_state)
    batch, seqlen, dim = x.shape
    dstate = A.shape[1]
    if initial_state is None:
        h = torch.zeros(batch, dim, dstate, dtype=acc, device=x.device)
    else:
        h = initial_state.to(acc)

    reset = None
    if seq_idx is not None and seqlen > 1:
        reset = F.pad(seq_idx[:, 1:] != seq_idx[:, :-1], (1, 0), value=False)  # (batch, seqlen)
    A2 = A.to(acc) * _LOG2E
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, dt, A, B, C, D, z, dt_bias, initial_state)
    )
    if not needs_grad:
        y, h = _forward_only(x, dt, A2, B, C, D, z, dt_bias, dt_softplus, h, reset, max(1, forward_chunk))
        return y, (h if return_final_state else None)

    xf = x.to(acc)
    delta = discretize_dt(dt, dt_bias, dt_softplus, acc)
    if recompute is None:
        recompute = batch * seqlen * dim * dstate > RECOMPUTE_ABOVE
    y, h = _scan_with_grad(h, delta, xf, A2, B.to(acc), C.to(acc), reset, max(1, chunk_size), recompute)
    if D is not None:
        y = y + xf * D.to(acc)
    if z is not None:
        y = y * F.silu(z.to(acc))
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
) -> torch.Tensor:
    """One decoding step: advances `state` (batch, dim, dstate) in place, returns y (batch, dim).

    x, dt, z (batch, dim); A (dim, dstate); B, C (batch, ngroups, dstate); D, dt_bias (dim,).
    One step is already a handful of whole-tensor ops, so the reference step is the fast path too.
    """
    return _reference_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)

