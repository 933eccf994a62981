"""Chunked, vectorized PyTorch backend of the Mamba-1 selective scan (S6), with a hand-written backward.

Same math as `reference.py`. Time is cut into chunks; for each chunk the decays dA = exp(delta * A)
and inputs dBx = delta * B * x of all its steps are computed at once as (chunk, batch, dim, dstate)
tensors, then the recurrence h_t = dA_t * h_{t-1} + dBx_t runs one fused multiply-add per step and
y_t = C_t . h_t is one small matmul. Decays are applied one step at a time, as in the recurrence
(no exp of cumulative sums, no division by decays), so the scan is as stable as the recurrence. No
(batch, seqlen, dim, dstate) tensor exists for the whole sequence at once.

Two paths:
- forward only (no autograd): chunk buffers are reused and updated in place;
- autograd: dt's discretization, D and the gate are recorded by PyTorch; the scan core is
  `_ScanFunction`, whose forward is the forward-only path keeping each chunk's start state, and whose
  backward recomputes each chunk from it and runs the adjoint recurrence in reverse, so memory kept
  for backward is O(seqlen * dim). At (1, 256, 1536, 16) fp32, one core, forward+backward went from
  ~87 ms (autograd recording ~6 nodes per step) to ~40 ms CPU.

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
from torch.autograd.function import once_differentiable

from mambakit.ops.selective_scan import reference
from mambakit.ops.selective_scan.reference import accumulation_dtype, discretize_dt

# Chunk length of `_ScanFunction` (forward buffers, backward recomputation). fp32 forward+backward at
# (1, 256, 1536, 16) on one core, CPU ms, min of 4, three runs on a loaded machine: 16 -> 37-45,
# 32 -> 41-66, 64 -> 56-86, 128 -> 42-91: the backward holds ~5 chunk tensors (1.5 MB each at 16),
# which stay in cache at 16.
CHUNK = 16
# Buffer length of the forward-only path, same trade-off: forward (1, 1024, 1536, 16) on one core,
# 16 -> 25 ms, 32 -> 22 ms, 64 -> 23 ms.
FORWARD_CHUNK = 32
# exp(v) = exp2(v * log2(e)); PyTorch's CPU exp2 is several times faster than exp on float32.
_LOG2E = 1.0 / math.log(2.0)
_LN2 = math.log(2.0)


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
    starts: list[torch.Tensor] | None = None,
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
        if starts is not None:  # for the backward of `_ScanFunction`
            starts.append(h.clone())
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


class _ScanFunction(torch.autograd.Function):
    """The scan core with a hand-written backward: y (without D / z) and the final state.

    forward(h0, delta, x, A2, B, C, reset, chunk): h0 (batch, dim, dstate); delta, x (batch, seqlen,
    dim); A2 = A * log2(e) (dim, dstate); B, C (batch, seqlen, ngroups, dstate); reset (batch,
    seqlen) bool or None. The forward is `_forward_only` and keeps only the state at each chunk start.
    The backward walks the chunks in reverse: it recomputes a chunk's decays and states from its
    start state, then runs the adjoint recurrence g_{t-1} = dA_t * g_t (+ C_t gy_{t-1}) one fused
    multiply-add per step, and forms every input's gradient with whole-chunk ops.
    Replaces an autograd graph of ~6 nodes per time step, whose backward cost ~2.5x the forward.
    """

    @staticmethod
    def forward(ctx, h0, delta, x, A2, B, C, reset, chunk):
        starts: list[torch.Tensor] = []
        y, h = _forward_only(x, delta, A2, B, C, None, None, None, False, h0, reset, chunk, starts)
        ctx.chunk = chunk
        ctx.has_reset = reset is not None
        extra = (reset,) if reset is not None else ()
        ctx.save_for_backward(delta, x, A2, B, C, *starts, *extra)
        return y, h

    @staticmethod
    @once_differentiable  # the backward is not itself recorded: a double backward raises clearly
    def backward(ctx, gy, gh):
        delta, x, A2, B, C, *rest = ctx.saved_tensors
        reset = rest.pop() if ctx.has_reset else None
        starts, chunk = rest, ctx.chunk
        batch, length, dim = x.shape
        ngroups, dstate = B.shape[2], B.shape[3]
        gsz = dim // ngroups
        acc, dev = A2.dtype, x.device
        g_delta, g_x = torch.empty_like(delta), torch.empty_like(x)
        g_B, g_C = torch.empty_like(B), torch.empty_like(C)
        A = A2 * _LN2  # d log(dA) / d delta; the ln 2 of exp2's derivative is folded in here
        # Chunk buffers allocated once and reused (fresh 1.5 MB tensors per chunk cost page faults
        # that were a large part of the backward on CPU). `gA_acc` sums delta * G * h_{t-1} * dA
        # over all chunks' steps: one fused multiply-add a chunk, one reduction at the end.
        dA_b = torch.empty(chunk, batch, dim, dstate, dtype=acc, device=dev)
        hs_b, G_b, gs_b = torch.empty_like(dA_b), torch.empty_like(dA_b), torch.empty_like(dA_b)
        gA_acc = torch.zeros_like(dA_b)
        dx_b = torch.empty(chunk, batch, dim, dtype=acc, device=dev)
        # gradient reaching the state after the current chunk from everything later
        carry = torch.zeros(batch, dim, dstate, dtype=acc, device=dev) if gh is None else gh.clone()
        if gy is None:
            gy = torch.zeros_like(x)
        for k in reversed(range(len(starts))):
            s = k * chunk
            e = min(s + chunk, length)
            q = e - s
            nb = q * batch * ngroups
            dA, hs, G, gs, dx = dA_b[:q], hs_b[:q], G_b[:q], gs_b[:q], dx_b[:q]
            dl = delta[:, s:e].transpose(0, 1)  # (q, batch, dim) views, time-major
            xc = x[:, s:e].transpose(0, 1)
            Bc = B[:, s:e].transpose(0, 1).contiguous()  # (q, batch, ngroups, dstate)
            Cc = C[:, s:e].transpose(0, 1).contiguous()
            gyc = gy[:, s:e].transpose(0, 1).contiguous()
            # recompute the chunk: decays, inputs, states
            torch.mul(dl[..., None], A2, out=dA).exp2_()  # (q, batch, dim, dstate)
            if reset is not None:
                dA.masked_fill_(reset[:, s:e].transpose(0, 1)[:, :, None, None], 0.0)
            torch.mul(dl, xc, out=dx)
            torch.mul(
                dx.view(q, batch, ngroups, gsz, 1),
                Bc.view(q, batch, ngroups, 1, dstate),
                out=hs.view(q, batch, ngroups, gsz, dstate),
            )
            prev = starts[k]
            for t in range(q):
                prev = hs[t].addcmul_(dA[t], prev)
            # y_t = C_t . h_t: gC_t = sum over the group's channels of gy_t h_t
            g_Cc = torch.bmm(gyc.view(nb, 1, gsz), hs.view(nb, gsz, dstate))
            g_C[:, s:e].copy_(g_Cc.view(q, batch, ngroups, dstate).transpose(0, 1))
            # G_t, the gradient of h_t: gy_t C_t + dA_{t+1} G_{t+1}
            torch.mul(
                gyc.view(q, batch, ngroups, gsz, 1),
                Cc.view(q, batch, ngroups, 1, dstate),
                out=G.view(q, batch, ngroups, gsz, dstate),
            )
            G[q - 1].add_(carry)
            for t in range(q - 2, -1, -1):
                G[t].addcmul_(dA[t + 1], G[t + 1])
            torch.mul(G[0], dA[0], out=carry)
            # h_t = dA_t h_{t-1} + dx_t B_t; gradient of log(dA_t) = delta_t A: G_t h_{t-1} dA_t
            torch.mul(G[1:], hs[:-1], out=gs[1:])
            torch.mul(G[0], starts[k], out=gs[0])
            gs.mul_(dA)
            gA_acc[:q].addcmul_(gs, dl[..., None])
            g_dx = torch.bmm(G.view(nb, gsz, dstate), Bc.view(nb, dstate, 1)).view(q, batch, dim)
            g_B[:, s:e].copy_(
                torch.bmm(dx.view(nb, 1, gsz), G.view(nb, gsz, dstate))
                .view(q, batch, ngroups, dstate)
                .transpose(0, 1)
            )
            g_x[:, s:e].copy_((g_dx * dl).transpose(0, 1))
            g_delta[:, s:e].copy_(torch.addcmul(gs.mul_(A).sum(-1), g_dx, xc).transpose(0, 1))
        g_A2 = gA_acc.sum((0, 1)).mul_(_LN2)  # d/dA2 = ln 2 * d/dA
        return carry, g_delta, g_x, g_A2, g_B, g_C, None, None


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

    x, dt, z (batch, dim) (dt (batch, dt_rank) with dt_proj_weight (dim, dt_rank)); A (dim, dstate);
    B, C (batch, ngroups, dstate); D, dt_bias (dim,).
    The reference's step with fewer, in-place ops: the groups' B and C are broadcast over their
    channels by views instead of `repeat_interleave` copies, the state is decayed and fed in place,
    and y = C . h is one batched matmul. At batch 1 every op here is a few microseconds of launch
    overhead on CPU, so the op count (11 instead of ~20) is what sets the cost.
    """
    if not state.is_contiguous() or (
        torch.is_grad_enabled()
        and any(
            t is not None and t.requires_grad for t in (state, x, dt, A, B, C, D, z, dt_bias, dt_proj_weight)
        )
    ):  # the in-place updates below would overwrite what autograd saves; views need a dense state
        return reference.selective_state_update_impl(
            state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, A_is_log, dt_proj_weight
        )
    acc = accumulation_dtype(state, x, dt, A, B, C, D, z, dt_bias, dt_proj_weight)
    if A_is_log:
        A = -torch.exp(A.to(acc))
    if dt_proj_weight is not None:
        dt = F.linear(dt.to(acc), dt_proj_weight.to(acc))
    batch, dim, dstate = state.shape
    ngroups = B.shape[1]
    delta = discretize_dt(dt, dt_bias, dt_softplus, acc)  # (batch, dim)
    xs = x.to(acc)
    h = state if state.dtype == acc else state.to(acc)
    # (batch, ngroups, group_size, dstate) views: a group's B and C broadcast over its channels
    hg = h.view(batch, ngroups, dim // ngroups, dstate)
    h.mul_(torch.exp2((delta * _LOG2E)[:, :, None] * A.to(acc)))  # exp2: ~2x faster than exp on CPU
    hg.addcmul_((delta * xs).view(batch, ngroups, -1, 1), B.to(acc)[:, :, None, :])
    y = torch.matmul(hg, C.to(acc)[:, :, :, None]).view(batch, dim)
    if D is not None:
        y = y.addcmul_(xs, D.to(acc))
    if z is not None:
        y = y.mul_(F.silu(z.to(acc)))
    if h is not state:
        state.copy_(h)
    return y.to(x.dtype)


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

    Keyword-only knobs (tests and benchmarks): when autograd records the scan, `chunk_size`, the
    chunk length of `_ScanFunction` (forward buffers and backward recomputation); otherwise
    `forward_chunk`, the buffer length of the forward-only path. `recompute` is accepted for
    compatibility and has no effect: the backward always recomputes each chunk from its start state.
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
    y, h = _ScanFunction.apply(h, delta, xf, A2, B.to(acc), C.to(acc), reset, max(1, chunk_size))
    if D is not None:
        y = y + xf * D.to(acc)
    if z is not None:
        y = y * F.silu(z.to(acc))
    return y.to(x.dtype), (h if return_final_state else None)
