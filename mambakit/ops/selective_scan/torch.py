"""Chunked, vectorized PyTorch backend of the Mamba-1 selective scan (S6); autograd by PyTorch.

Same math as `reference.py`. The sequence is cut into chunks of CHUNK steps and the recurrence
h_t = dA_t * h_{t-1} + dBx_t is solved in two levels, so that Python loops run CHUNK + seqlen / CHUNK
times instead of seqlen times, each step acting on many chunks at once:

1. inside every chunk at once, from a zero start: local_t = dA_t * local_{t-1} + dBx_t (CHUNK steps);
2. across chunks: start_{c+1} = decay_c * start_c + local_c[last] (one step a chunk);
3. h_t = local_t + decay_t * start_c, with decay_t = exp(A * sum_{s<=t in chunk} delta_s).

decay_t is the product of dA over the chunk up to t: exponents are sums of delta * A over s <= t only,
so it never overflows where the scan itself does not (no exp(+cumsum) and no division by decays).
Chunks are processed BLOCK steps at a time, so no (batch, seqlen, dim, dstate) tensor exists for the
whole sequence; when gradients are needed each block is recomputed in the backward pass
(activation checkpointing) so that memory kept for backward is O(seqlen * dim), not O(seqlen * dim *
dstate).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mambakit.ops.selective_scan.reference import accumulation_dtype, discretize_dt
from mambakit.ops.selective_scan.reference import selective_state_update_impl as _reference_update

# Chunk length: the Python loop count per block is CHUNK + BLOCK / CHUNK, smallest near sqrt(BLOCK);
# measured on 2 CPU cores at (1, 1024, 1536, 16) fp32, CHUNK 16 and 32 were within noise of each
# other and faster than 8 or 64 (see the report in benchmarks / the helper's measurements).
CHUNK = 16
# Steps processed at once: large enough that the inter-chunk loop is short and each op is big, small
# enough that the (BLOCK, batch, dim, dstate) temporaries stay in a few tens of MB.
BLOCK = 256
FORWARD_CHUNK = 32
RECOMPUTE = True
# exp(v) = exp2(v * log2(e)); PyTorch's CPU exp2 is several times faster than exp on float32.
_LOG2E = 1.0 / math.log(2.0)


def _time_major(u: torch.Tensor, nchunks: int, chunk: int) -> torch.Tensor:
    """(batch, nchunks * chunk, ...) -> (chunk, nchunks, batch, ...), contiguous."""
    batch = u.shape[0]
    u = u.reshape(batch, nchunks, chunk, *u.shape[2:])
    return u.permute(2, 1, 0, *range(3, u.ndim)).contiguous()


def _scan_block(
    h: torch.Tensor,
    delta: torch.Tensor,
    x: torch.Tensor,
    A2: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    reset: torch.Tensor | None,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scan one block of whole chunks.

    h (batch, dim, dstate) state before the block; delta, x (batch, L, dim) with L a multiple of
    `chunk`; A2 = A * log2(e) (dim, dstate); B, C (batch, L, ngroups, dstate); reset (batch, L) bool,
    True where the state carried into t is zero. Returns y (batch, L, dim) without D / z, and the state
    after the block.
    """
    batch, length, dim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    nchunks = length // chunk
    group_size = dim // ngroups
    delta_c = _time_major(delta, nchunks, chunk)  # (chunk, nchunks, batch, dim)
    x_c = _time_major(x, nchunks, chunk)
    B_c = _time_major(B, nchunks, chunk)  # (chunk, nchunks, batch, ngroups, dstate)
    C_c = _time_major(C, nchunks, chunk)
    shape5 = (chunk, nchunks, batch, dim, dstate)

    dA = torch.exp2(delta_c[..., None] * A2)  # (chunk, nchunks, batch, dim, dstate)
    dBx = ((delta_c * x_c).view(chunk, nchunks, batch, ngroups, group_size, 1) * B_c.unsqueeze(4)).view(
        shape5
    )
    # decay_t = dA_0 * ... * dA_t inside the chunk, from a cumulative sum of log-decays (all <= t).
    decay = torch.exp2(torch.cumsum(delta_c, dim=0)[..., None] * A2)
    if reset is not None:
        reset_c = _time_major(reset, nchunks, chunk)[..., None, None]  # (chunk, nchunks, batch, 1, 1)
        dA = torch.where(reset_c, 0.0, dA)
        # Once a reset has happened in the chunk, nothing from before the chunk reaches t.
        seen = torch.cumsum(reset_c.to(torch.int32), dim=0) > 0
        decay = torch.where(seen, 0.0, decay)

    # 1. Local scans from zero, all chunks at once. unbind (not indexing) keeps the backward linear:
    #    each indexed view would scatter its gradient into a zeros tensor of the whole chunk.
    dA_t, dBx_t = dA.unbind(0), dBx.unbind(0)
    local = dBx_t[0]
    locals_ = [local]
    for t in range(1, chunk):
        local = torch.addcmul(dBx_t[t], dA_t[t], local)
        locals_.append(local)
    local_all = torch.stack(locals_)  # (chunk, nchunks, batch, dim, dstate)

    # 2. States at chunk starts, carried across chunks.
    starts = []
    for decay_c, last_c in zip(decay[-1].unbind(0), locals_[-1].unbind(0)):
        starts.append(h)
        h = torch.addcmul(last_c, decay_c, h)
    start_all = torch.stack(starts)  # (nchunks, batch, dim, dstate)

    # 3. Full states and outputs.
    states = torch.addcmul(local_all, decay, start_all)
    y = torch.einsum(
        "tcbgpn,tcbgn->tcbgp", states.view(chunk, nchunks, batch, ngroups, group_size, dstate), C_c
    )
    y = y.reshape(chunk, nchunks, batch, dim).permute(2, 1, 0, 3).reshape(batch, length, dim)
    return y, h


def _scan_no_grad(
    h: torch.Tensor,
    delta: torch.Tensor,
    x: torch.Tensor,
    A2: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    reset: torch.Tensor | None,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward-only scan: one step at a time inside chunks, in reused buffers (no autograd).

    Same arguments as `_scan_block` but any length. Without autograd there is nothing to gain from
    the two-level split: plain steps touch each state once, and reusing the (chunk, batch, dim, dstate)
    buffers keeps them in cache and avoids fresh memory for every op.
    """
    batch, length, dim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    group_size = dim // ngroups
    delta_t = delta.transpose(0, 1).contiguous()  # (length, batch, dim)
    dx_t = (delta * x).transpose(0, 1).contiguous()
    B_t = B.transpose(0, 1).contiguous()  # (length, batch, ngroups, dstate)
    C_t = C.transpose(0, 1).contiguous()
    reset_t = None if reset is None else reset.transpose(0, 1)[:, :, None, None]  # (length, batch, 1, 1)
    dA = torch.empty(chunk, batch, dim, dstate, dtype=x.dtype, device=x.device)
    hs = torch.empty_like(dA)  # dBx, then overwritten in place by the states
    y = torch.empty(length, batch, dim, dtype=x.dtype, device=x.device)
    h = h.clone()
    for s in range(0, length, chunk):
        e = min(s + chunk, length)
        a, u = dA[: e - s], hs[: e - s]
        torch.mul(delta_t[s:e, :, :, None], A2, out=a)
        a.exp2_()
        if reset_t is not None:
            a.masked_fill_(reset_t[s:e], 0.0)
        torch.mul(
            dx_t[s:e].view(e - s, batch, ngroups, group_size, 1),
            B_t[s:e].view(e - s, batch, ngroups, 1, dstate),
            out=u.view(e - s, batch, ngroups, group_size, dstate),
        )
        prev = h
        for t in range(e - s):
            prev = u[t].addcmul_(a[t], prev)
        h.copy_(prev)
        nb = (e - s) * batch * ngroups
        # y = C . h as (1, dstate) @ (dstate, group_size): ~3x faster on CPU than h @ C, same numbers.
        torch.bmm(
            C_t[s:e].reshape(nb, 1, dstate),
            u.view(nb, group_size, dstate).transpose(1, 2),
            out=y[s:e].view(nb, 1, group_size),
        )
    return y.transpose(0, 1), h


def _scan_with_grad(
    h: torch.Tensor,
    delta: torch.Tensor,
    x: torch.Tensor,
    A2: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    reset: torch.Tensor | None,
    chunk_size: int,
    block_len: int,
    recompute: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scan recorded by autograd: two-level blocks (`_scan_block`), optionally checkpointed.

    Same arguments as `_scan_block`, any length. Returns y (batch, seqlen, dim) and the final state.
    """
    batch, seqlen, dim = x.shape
    # Short sequences run as one chunk; otherwise pad to whole chunks with delta = 0, x = B = C = 0,
    # steps that leave the state unchanged (dA = 1, dBx = 0) and whose outputs are dropped.
    chunk = max(1, min(chunk_size, seqlen))
    padded = -(-seqlen // chunk) * chunk
    if padded != seqlen:
        pad = padded - seqlen
        delta, x = F.pad(delta, (0, 0, 0, pad)), F.pad(x, (0, 0, 0, pad))
        B, C = F.pad(B, (0, 0, 0, 0, 0, pad)), F.pad(C, (0, 0, 0, 0, 0, pad))
        if reset is not None:
            reset = F.pad(reset, (0, pad), value=False)
    block = max(1, block_len // chunk) * chunk
    ys = []
    for s in range(0, padded, block):
        e = min(s + block, padded)
        args = (h, delta[:, s:e], x[:, s:e], A2, B[:, s:e], C[:, s:e])
        r = None if reset is None else reset[:, s:e]
        if recompute:
            y_blk, h = checkpoint(_scan_block, *args, r, chunk, use_reentrant=False)
        else:
            y_blk, h = _scan_block(*args, r, chunk)
        ys.append(y_blk)
    y = torch.cat(ys, dim=1)[:, :seqlen] if ys else x.new_zeros(batch, 0, dim)
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
    block_len: int = BLOCK,
    recompute: bool = RECOMPUTE,
    forward_chunk: int = FORWARD_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked selective scan; arguments and shapes as in `mambakit.ops.selective_scan`.

    x, dt, z (batch, seqlen, dim); A (dim, dstate); B, C (batch, seqlen, ngroups, dstate);
    D, dt_bias (dim,); initial_state (batch, dim, dstate); seq_idx (batch, seqlen).
    Returns y (batch, seqlen, dim) in x's dtype and the final state (batch, dim, dstate) in float32
    (float64 for float64 inputs), or None.

    Keyword-only knobs (tests and benchmarks): when autograd records the scan, `chunk_size`,
    `block_len` (rounded down to whole chunks) and `recompute` (checkpoint each block); otherwise
    `forward_chunk`, the buffer length of the forward-only path.
    """
    acc = accumulation_dtype(x, dt, A, B, C, D, z, dt_bias, initial_state)
    batch, seqlen, dim = x.shape
    dstate = A.shape[1]
    if initial_state is None:
        h = torch.zeros(batch, dim, dstate, dtype=acc, device=x.device)
    else:
        h = initial_state.to(acc)

    xf = x.to(acc)
    delta = discretize_dt(dt, dt_bias, dt_softplus, acc)
    Bf, Cf = B.to(acc), C.to(acc)
    reset = None
    if seq_idx is not None and seqlen > 1:
        reset = F.pad(seq_idx[:, 1:] != seq_idx[:, :-1], (1, 0), value=False)  # (batch, seqlen)

    A2 = A.to(acc) * _LOG2E
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, dt, A, B, C, dt_bias, initial_state)
    )
    if not needs_grad:
        y, h = _scan_no_grad(h, delta, xf, A2, Bf, Cf, reset, max(1, forward_chunk))
    else:
        y, h = _scan_with_grad(h, delta, xf, A2, Bf, Cf, reset, chunk_size, block_len, recompute)

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


def __getattr__(name: str):
    # Importing this submodule rebinds the name `torch` inside the package's __init__ (Python sets
    # package.torch = this module), where `torch.float32` etc. must still mean the library. Forward
    # names this module lacks to the library so that the entry keeps working after the backend loads.
    return getattr(torch, name)
